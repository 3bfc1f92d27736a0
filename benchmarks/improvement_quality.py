"""Quality benchmark of answer improvement on the embedded model (issue 20).

For every prompt of the fixed set ``benchmarks/data/improvement_prompts.json`` (checkable
prompts with accepted answer words, and open prompts) it runs a plain answer and an improvement
run, greedy, through the spec's Python API (``ConversationEngine`` for the plain answer, the
outputs module's ``stream_and_improve_reply`` for improvement, which also hands back the gate's
decisions) and/or the spec's HTTP API (``POST /chat/blocking`` with ``improvement`` and
``intermediate_steps``, on a server it starts, or ``--url``). It reports draft vs final accuracy,
degenerate finals, the revisions' acceptance rate, the improvement/plain wall-time ratio, and
(Python API) what each gate policy would have made of revision 1 from the same passes.

A final answer is *degenerate* when it is empty, a fragment (under 3 words) or a bare number
while the draft was not, or under a third of a real draft's length (a draft of 80+ characters).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 10 python benchmarks/improvement_quality.py \\
        --api both --max-new-tokens 64

Results (JSON per prompt + a Markdown summary) go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from improvement_passes import parse as parse_log  # noqa: E402
from improvement_passes import report as passes_report  # noqa: E402

DATA = HERE / "data" / "improvement_prompts.json"
RESULTS = HERE / "results"
STAMP = time.strftime("%Y%m%d-%H%M%S")


def correct(answer: str, accept: list[str]) -> bool:
    """Any accepted word in ``answer`` (whole word, case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE) for word in accept)


def degenerate(final: str, draft: str) -> str | None:
    """Why ``final`` is degenerate next to ``draft`` (None: it is not)."""
    from llm_server.conversation_engine.improvement_gate import REAL_ANSWER_CHARS, is_bare_number, is_fragment

    if not final.strip():
        return "empty"
    if is_fragment(final) and not is_fragment(draft):
        return "fragment"
    if is_bare_number(final) and not is_bare_number(draft):
        return "bare number"
    if len(draft) >= REAL_ANSWER_CHARS and 3 * len(final) < len(draft):
        return "under a third of the draft"
    return None


def load_prompts(subset: int | None) -> list[dict[str, Any]]:
    data = json.loads(DATA.read_text())
    checkable = [{**p, "kind": "checkable"} for p in data["checkable"]]
    open_ = [{**p, "kind": "open", "accept": []} for p in data["open"]]
    if subset is not None:  # spread over the set: every kind of question (capitals, arithmetic, ... authors)
        checkable = checkable[:: max(1, len(checkable) // subset)][:subset]
        open_ = open_[:: max(1, len(open_) // max(1, subset // 2))][: max(1, subset // 2)]
    return checkable + open_


# --------------------------------------------------------------------------- Python API


def counterfactual(decision: Any, policy: str) -> bool:
    """Whether ``policy`` would have adopted the revision of this recorded decision."""
    from llm_server.conversation_engine.improvement_gate import decide

    return decide(decision.stage, decision.previous, decision.candidate, decision.problem, decision.votes,
                  policy).adopted


def answer_logprob(tok: Any, model: Any, system_prompts: Any, question: str, answer: str) -> float:
    """The model's mean log-probability per token of ``answer`` as the assistant's reply to ``question``
    (the gate's third candidate of issue 20: the likelihood of each answer given the question)."""
    import torch

    from llm_server.conversation_engine.inputs import DEFAULT_ROLE, build_messages

    text = tok.apply_chat_template(build_messages(system_prompts, question, DEFAULT_ROLE, []), tokenize=False,
                                   add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        return float("-inf")
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1 : -1].float()
    chosen = torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids)[:, None])
    return float(chosen.mean())


def likelihood_adopts(tok: Any, model: Any, system_prompts: Any, question: str, previous: str, candidate: str,
                      passes_checks: bool) -> bool:
    """Policy ``likelihood``: the checks, then the revision only if the model finds it likelier per token."""
    if not passes_checks:
        return False
    return (answer_logprob(tok, model, system_prompts, question, candidate)
            > answer_logprob(tok, model, system_prompts, question, previous))


def load_model() -> tuple[Any, Any, Any]:
    """The embedded model (float32, unquantized, as the Python API run uses it) and the system prompts."""
    from llm_server.helper_functionality.model_loading import initialize
    from llm_server.helper_functionality.yaml_loading import load_system_prompt

    tok, model = initialize(device="cpu", model_id="embedded:SmolLM2-135M-Instruct", dtype="float32",
                            compile=False, quantization="none")
    return tok, model, load_system_prompt()


def rescore(path: Path) -> list[dict[str, Any]]:
    """A saved Python run's rows (``*_python.json`` or ``*_python_partial.json``) with policy ``likelihood``
    added: each stage-1 revision that passed the checks, scored against the draft by the same model."""
    data = json.loads(path.read_text())
    rows = data if isinstance(data, list) else data["rows"]["python"]
    tok, model, prompts_yaml = load_model()
    for r in rows:
        by_policy, draft = r["stage1_by_policy"], r["result"]["draft_answer"]
        adopted = likelihood_adopts(tok, model, prompts_yaml, r["prompt"], draft, by_policy["none"],
                                    by_policy["checks"] != draft)
        by_policy["likelihood"] = by_policy["none"] if adopted else draft
    return rows


def run_python(prompts: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    from llm_server.conversation_engine.conversation_engine import ConversationEngine
    from llm_server.conversation_engine.outputs import stream_and_improve_reply

    tok, model, prompts_yaml = load_model()
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    plain_engine = ConversationEngine(tok, model, prompts_yaml, **kwargs)
    rows = []
    for item in prompts:
        start = time.perf_counter()
        plain = plain_engine.reset().reply(item["prompt"])
        plain_s = time.perf_counter() - start
        result: dict[str, str] = {}
        decisions: list[Any] = []
        start = time.perf_counter()
        for _ in stream_and_improve_reply(tok, model, prompts_yaml, item["prompt"], result=result,
                                          decisions=decisions, **kwargs):
            pass
        improve_s = time.perf_counter() - start
        stage1 = decisions[0] if decisions else None
        policies = {p: (stage1.candidate if stage1 and counterfactual(stage1, p) else result["draft_answer"])
                    for p in ("none", "checks", "judge")}
        if stage1 is not None and likelihood_adopts(tok, model, prompts_yaml, item["prompt"], stage1.previous,
                                                    stage1.candidate, counterfactual(stage1, "checks")):
            policies["likelihood"] = stage1.candidate
        else:
            policies["likelihood"] = result["draft_answer"]
        rows.append(row(item, plain, plain_s, result, improve_s,
                        adopted=[d.adopted for d in decisions], stage1_by_policy=policies))
        print(summary_line(rows[-1]), flush=True)
        checkpoint("python", rows)
    return rows


# --------------------------------------------------------------------------- HTTP API


def start_server(port: int, shipped: bool = False, log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """The real server on ``port`` (float32 and unquantized like the Python API run, or with
    ``shipped`` the model_config.yaml as shipped: bf16 / int4 ``auto``); returns (process, url).
    ``log``: the server logs at debug level into that file (for ``improvement_passes.py``)."""
    import yaml

    from llm_server.helper_functionality.yaml_loading import PACKAGE_CONFIG_DIR

    config = yaml.safe_load((Path(PACKAGE_CONFIG_DIR) / "model_config.yaml").read_text())
    if not shipped:
        config["model"]["optimizations"].update(dtype="float32", quantization=None)
    folder = Path(tempfile.mkdtemp(prefix="improvement-bench-"))
    (folder / "model_config.yaml").write_text(yaml.safe_dump(config))
    # the worktree's own server (python -m): the installed console script may point at another checkout
    command = [sys.executable, "-m", "llm_server.api.server", "--port", str(port), "--open-access",
               "--config-dir", str(folder), "--log-level", "warning" if log is None else "debug"]
    output = None if log is None else log.open("wb")
    process = subprocess.Popen(command, env={**os.environ}, stdout=output, stderr=output)
    if output is not None:
        output.close()  # the server holds its own copy of the file
    url = f"http://127.0.0.1:{port}"
    import requests

    for _ in range(600):
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:  # not listening yet, or too busy loading to answer
            pass
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        time.sleep(1)
    raise RuntimeError("the server did not become ready")


def run_http(prompts: list[dict[str, Any]], max_new_tokens: int, url: str,
             temperature: float = 0.0) -> list[dict[str, Any]]:
    """Each prompt plain, then improved, through ``POST /chat/blocking``: greedy unless ``temperature``
    (then sampled; the spec's endpoints take no seed)."""
    import requests

    rows = []
    for item in prompts:
        body = {"prompt": item["prompt"], "max_new_tokens": max_new_tokens, "temperature": temperature}
        start = time.perf_counter()
        plain = requests.post(f"{url}/chat/blocking", json=body, timeout=900).json()["reply"]
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        response = requests.post(f"{url}/chat/blocking", timeout=900,
                                 json={**body, "improvement": True, "intermediate_steps": True})
        improve_s = time.perf_counter() - start
        response.raise_for_status()
        result = response.json()
        adopted = [result.get(key, "").startswith("Adopted") for key in ("comments1", "comments2")]
        rows.append(row(item, plain, plain_s, result, improve_s, adopted=adopted))
        print(summary_line(rows[-1]), flush=True)
        checkpoint("http", rows)
    return rows


# --------------------------------------------------------------------------- report


def row(item: dict[str, Any], plain: str, plain_s: float, result: dict[str, str], improve_s: float,
        **extra: Any) -> dict[str, Any]:
    draft, final = result["draft_answer"], result["reply"]
    accept = item["accept"]
    return {
        "id": item["id"], "kind": item["kind"], "prompt": item["prompt"], "accept": accept,
        "plain": plain, "plain_s": round(plain_s, 2), "improve_s": round(improve_s, 2),
        "draft_correct": correct(draft, accept) if accept else None,
        "final_correct": correct(final, accept) if accept else None,
        "degenerate": degenerate(final, draft), "result": result, **extra,
    }


def checkpoint(api: str, rows: list[dict[str, Any]]) -> None:
    """Keep the rows so far (a run cut short still leaves its results)."""
    (RESULTS / f"improvement_quality_{STAMP}_{api}_partial.json").write_text(json.dumps(rows, indent=1))


def summary_line(r: dict[str, Any]) -> str:
    return (f"{r['id']:<20} draft_ok={r['draft_correct']!s:<5} final_ok={r['final_correct']!s:<5} "
            f"degenerate={r['degenerate']} adopted={r['adopted']} plain={r['plain_s']}s improve={r['improve_s']}s")


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checkable = [r for r in rows if r["kind"] == "checkable"]
    revisions = [a for r in rows for a in r["adopted"]]
    ratios = sorted(r["improve_s"] / r["plain_s"] for r in rows if r["plain_s"] > 0)
    out = {
        "prompts": len(rows), "checkable": len(checkable),
        "draft_accuracy": sum(bool(r["draft_correct"]) for r in checkable),
        "final_accuracy": sum(bool(r["final_correct"]) for r in checkable),
        "degenerate_finals": sum(r["degenerate"] is not None for r in rows),
        "revisions": len(revisions), "revisions_adopted": sum(revisions),
        "plain_s_total": round(sum(r["plain_s"] for r in rows), 1),
        "improve_s_total": round(sum(r["improve_s"] for r in rows), 1),
        "ratio_median": round(ratios[len(ratios) // 2], 2) if ratios else None,
    }
    out["ratio_total"] = round(out["improve_s_total"] / out["plain_s_total"], 2) if out["plain_s_total"] else None
    if rows and "stage1_by_policy" in rows[0]:
        out["revision1_by_policy"] = {
            policy: {
                "accuracy": sum(correct(r["stage1_by_policy"][policy], r["accept"]) for r in checkable),
                "degenerate": sum(degenerate(r["stage1_by_policy"][policy], r["result"]["draft_answer"]) is not None
                                  for r in rows),
            } for policy in rows[0]["stage1_by_policy"]
        }
    return out


def markdown(tables: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"# Improvement quality ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`{' '.join(sys.argv)}`; max_new_tokens={args.max_new_tokens}, "
             f"{'greedy' if args.temperature <= 0 else f'HTTP sampled at temperature {args.temperature}'}, "
             f"{'the shipped model settings' if args.shipped else 'float32'}, CPU.", "",
             "| API | prompts | draft acc. | final acc. | degenerate finals | revisions adopted | "
             "improve/plain (total) | median ratio |", "|---|---|---|---|---|---|---|---|"]
    for api, t in tables.items():
        lines.append(f"| {api} | {t['prompts']} | {t['draft_accuracy']}/{t['checkable']} | "
                     f"{t['final_accuracy']}/{t['checkable']} | {t['degenerate_finals']} | "
                     f"{t['revisions_adopted']}/{t['revisions']} | {t['ratio_total']}x "
                     f"({t['improve_s_total']} s / {t['plain_s_total']} s) | {t['ratio_median']}x |")
    for api, t in tables.items():
        if "revision1_by_policy" in t:
            lines += ["", f"Gate policies on revision 1 ({api}, same passes): accuracy / degenerate", "",
                      "| policy | accuracy after revision 1 | degenerate |", "|---|---|---|"]
            lines += [f"| {p} | {v['accuracy']}/{t['checkable']} | {v['degenerate']} |"
                      for p, v in t["revision1_by_policy"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=["python", "http", "both"], default="both")
    parser.add_argument("--subset", type=int, help="only N checkable and N/2 open prompts, spread over the set")
    parser.add_argument("--http-subset", type=int, help="--subset for the HTTP API only")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="HTTP API: sample at this temperature (unseeded) instead of greedy decoding")
    parser.add_argument("--shipped", action="store_true",
                        help="HTTP API: the server's model settings as shipped (not float32 / unquantized)")
    parser.add_argument("--server-log", type=Path,
                        help="HTTP API: the started server logs at debug level into this file; the report adds "
                             "the time of each pass and the floor (improvement_passes.py)")
    parser.add_argument("--rescore", type=Path,
                        help="add gate policy 'likelihood' to this saved Python run's rows (no new answers)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    tables: dict[str, dict[str, Any]] = {}
    all_rows: dict[str, list[dict[str, Any]]] = {}
    if args.rescore is not None:
        all_rows["python"] = rescore(args.rescore)
        tables["python"] = table(all_rows["python"])
    elif args.api in ("python", "both"):
        all_rows["python"] = run_python(load_prompts(args.subset), args.max_new_tokens)
        tables["python"] = table(all_rows["python"])
    if args.api in ("http", "both") and args.rescore is None:
        process, url = (None, args.url) if args.url else start_server(args.port, args.shipped, args.server_log)
        try:
            subset = args.http_subset if args.http_subset is not None else args.subset
            all_rows["http"] = run_http(load_prompts(subset), args.max_new_tokens, url, args.temperature)
            tables["http"] = table(all_rows["http"])
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
    if args.rescore is not None:  # beside the run it rescored
        base = RESULTS / f"{args.rescore.stem}_rescored"
    else:
        base = RESULTS / f"improvement_quality_{STAMP}_{args.api}"
    base.with_suffix(".json").write_text(json.dumps({"tables": tables, "rows": all_rows}, indent=1))
    report = markdown(tables, args)
    if args.server_log is not None and args.url is None and "http" in all_rows:
        log_lines = args.server_log.read_text(errors="replace").splitlines()
        report += f"\n## HTTP passes (server log `{args.server_log}`)\n\n{passes_report(parse_log(log_lines))}"
    base.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
