"""Report writing: markdown tables (printed and saved) and the raw numbers as JSON.

Results are grouped ``{group: {server: [LevelResult per concurrency level]}}``: a group is a dtype
for ours and ``transformers serve`` (both load the same de-quantized folder at that dtype), and
:data:`GGUF_GROUP` for llama-server, which runs the GGUF file itself. Every results file records
the machine: CPU model and flags (``lscpu``), core count, OS and library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from llm_server.engine.wait_policy import SERVER_SPINCOUNT
from servebench.client import PROMPTS, LevelResult, fmt_ms

#: The results group of llama-server (it serves the GGUF's own quantized weights, not a dtype).
GGUF_GROUP = "gguf"
#: The level whose memory is compared (issue 9: RSS after 16 concurrent requests).
RSS_LEVEL = 16


def fmt_ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "—"
    return f"{ours / peer:.2f}x"


def machine_info() -> dict[str, str]:
    """nproc, CPU model and flags (lscpu), OS, Python/torch/transformers versions (without importing torch)."""
    info = {"nproc": str(os.cpu_count()), "python": platform.python_version(), "os": platform.platform()}
    omp = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
           if os.environ.get(name)]
    default = f"none exported (ours: the server's default GOMP_SPINCOUNT={SERVER_SPINCOUNT})"
    info["omp_env"] = ", ".join(omp) or default
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("Flags:"):
                info["cpu_flags"] = line.split(":", 1)[1].strip()
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "openai"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    return info


def level_table(group: str, by_server: dict[str, list[LevelResult]], max_tokens: int) -> str:
    """Markdown table of one group (a dtype, or llama-server's GGUF): ours and the peer side by side
    (ratios ours/peer) when both ran, else one table per server."""
    ours, peer = by_server.get("ours"), by_server.get("peer")
    rows = []
    if ours is not None and peer is not None:
        rows.append("| concurrent | tok/s ours | tok/s peer | ratio | TTFT p50 ours / peer | TTFT p95 ours / peer "
                    "| TTFT p95 ratio | ITL p50 ours / peer | ITL ratio | full-length ours / peer |")
        rows.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for o, p in zip(ours, peer, strict=True):
            rows.append(
                f"| {o.concurrency} | {o.tokens_per_s:.1f} | {p.tokens_per_s:.1f} "
                f"| **{fmt_ratio(o.tokens_per_s, p.tokens_per_s)}** "
                f"| {fmt_ms(o.ttft_p50_s)} / {fmt_ms(p.ttft_p50_s)} | {fmt_ms(o.ttft_p95_s)} / {fmt_ms(p.ttft_p95_s)} "
                f"| {fmt_ratio(o.ttft_p95_s, p.ttft_p95_s)} | {fmt_ms(o.itl_p50_s)} / {fmt_ms(p.itl_p50_s)} "
                f"| {fmt_ratio(o.itl_p50_s, p.itl_p50_s)} "
                f"| {o.full_length} of {o.requests} / {p.full_length} of {p.requests} |"
            )
    else:
        for name, results in by_server.items():
            rows.append(f"| concurrent | tok/s {name} | TTFT p50 | TTFT p95 | ITL p50 | full-length | errors |")
            rows.append("|---:|---:|---:|---:|---:|---:|---:|")
            for r in results:
                rows.append(f"| {r.concurrency} | {r.tokens_per_s:.1f} | {fmt_ms(r.ttft_p50_s)} "
                            f"| {fmt_ms(r.ttft_p95_s)} | {fmt_ms(r.itl_p50_s)} | {r.full_length}/{r.requests} "
                            f"| {r.errors} |")
    what = "llama-server on the GGUF" if group == GGUF_GROUP else f"dtype {group}"
    title = f"### {what}, {max_tokens} new tokens per request, streaming, greedy"
    return "\n".join([title, "", *rows])


def fairness_notes(results: dict[str, dict[str, list[LevelResult]]], max_tokens: int) -> list[str]:
    """Lines that flag anything making the comparison unequal (errors, short answers, prompt lengths)."""
    notes = []
    for dtype, by_server in results.items():
        for name, levels in by_server.items():
            errors = sum(level.errors for level in levels)
            short = sum(level.requests - level.errors - level.full_length for level in levels)
            if errors:
                samples = sorted({s for level in levels for s in level.error_samples})[:3]
                notes.append(f"- {name} ({dtype}): {errors} failed requests, e.g. {samples}")
            if short:
                notes.append(f"- {name} ({dtype}): {short} requests stopped before {max_tokens} tokens")
            else:
                notes.append(f"- {name} ({dtype}): every request generated exactly {max_tokens} tokens")
            noisy = [f"c={lv.concurrency}: {lv.other_cpu_cores:.2f}" for lv in levels
                     if lv.other_cpu_cores is not None and lv.other_cpu_cores > 0.25]
            if noisy:
                notes.append(f"- {name} ({dtype}): other processes used CPU (cores) during {', '.join(noisy)}"
                             " — those levels are disturbed")
            if not all(level.tokens_from_usage for level in levels):
                notes.append(f"- {name} ({dtype}): no `usage` in the stream; tokens counted as content chunks")
        prompts = {name: [None if lv.prompt_tokens_mean is None else round(lv.prompt_tokens_mean, 2)
                          for lv in levels] for name, levels in by_server.items()}
        if {"ours", "peer"} <= set(prompts):
            pairs = [(o.texts.get(i), p.texts.get(i)) for o, p in zip(by_server["ours"], by_server["peer"], strict=True)
                     for i in set(o.texts) | set(p.texts)]
            equal = sum(1 for a, b in pairs if a is not None and a == b)
            shared = [len(os.path.commonprefix([a, b])) / max(len(a), len(b), 1) for a, b in pairs if a and b]
            median = statistics.median(shared) if shared else 0.0
            notes.append(f"- {dtype}: greedy text identical on both servers for {equal} of {len(pairs)} requests, "
                         f"median common prefix {median:.0%} of the text (low-precision batched math may flip a "
                         "near-tie token and the texts part there; float32 should match)")
            same = prompts["ours"] == prompts["peer"]
            notes.append(f"- {dtype}: mean prompt tokens per level {'equal' if same else 'DIFFER'} "
                         f"(ours {prompts['ours']}, peer {prompts['peer']})")
        else:
            for name, means in prompts.items():
                notes.append(f"- {name} ({dtype}): mean prompt tokens per level {means}")
    return notes


def best_by_dtype(by_dtype: dict[str, list[LevelResult]], concurrency: int) -> tuple[str, LevelResult] | None:
    """(dtype, level) with the highest tokens/s at ``concurrency`` among the dtypes measured."""
    candidates = [(dtype, level) for dtype, levels in by_dtype.items() for level in levels
                  if level.concurrency == concurrency]
    return max(candidates, key=lambda item: item[1].tokens_per_s) if candidates else None


def target_summary(results: dict[str, dict[str, list[LevelResult]]]) -> list[str]:
    """Issue 5's target, each server at its best dtype: >=1.2x tokens/s and TTFT p95 no worse at the highest
    concurrency, no slower at 1."""
    per_server = by_name(results)
    if not {"ours", "peer"} <= set(per_server):
        return []
    lines = ["| check (best dtype of each) | ours | peer | ratio | target | met |", "|---|---:|---:|---:|---:|:-:|"]
    all_levels = sorted({lv.concurrency for levels in per_server["ours"].values() for lv in levels})
    top = all_levels[-1]
    ours_top, peer_top = best_by_dtype(per_server["ours"], top), best_by_dtype(per_server["peer"], top)
    if ours_top and peer_top:
        (od, o), (pd, p) = ours_top, peer_top
        ratio = o.tokens_per_s / p.tokens_per_s if p.tokens_per_s else 0.0
        lines.append(f"| tok/s at {top} concurrent | {o.tokens_per_s:.1f} ({od}) | {p.tokens_per_s:.1f} ({pd}) "
                     f"| {ratio:.2f}x | >= 1.20x | {'yes' if ratio >= 1.2 else 'NO'} |")
        if o.ttft_p95_s is not None and p.ttft_p95_s is not None:
            ok = o.ttft_p95_s <= p.ttft_p95_s
            lines.append(f"| TTFT p95 at {top} concurrent | {fmt_ms(o.ttft_p95_s)} | {fmt_ms(p.ttft_p95_s)} "
                         f"| {fmt_ratio(o.ttft_p95_s, p.ttft_p95_s)} | <= 1.00x | {'yes' if ok else 'NO'} |")
    if 1 in all_levels:
        ours_one, peer_one = best_by_dtype(per_server["ours"], 1), best_by_dtype(per_server["peer"], 1)
        if ours_one and peer_one:
            (od, o), (pd, p) = ours_one, peer_one
            ratio = o.tokens_per_s / p.tokens_per_s if p.tokens_per_s else 0.0
            lines.append(f"| tok/s at 1 concurrent | {o.tokens_per_s:.1f} ({od}) | {p.tokens_per_s:.1f} ({pd}) "
                         f"| {ratio:.2f}x | >= 1.00x | {'yes' if ratio >= 1.0 else 'NO'} |")
    return ["### Target (issue 5)", "", *lines, ""]


def render_report(args: argparse.Namespace, results: dict[str, dict[str, list[LevelResult]]],
                  info: dict[str, str], model_dir: Path, elapsed_s: float, loads: list[str],
                  commands: dict[str, str], counts: list[int]) -> str:
    """The whole markdown report: tables, target checks, memory, fairness notes, machine and commands."""
    parts = [f"## Serving benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    for group, by_server in results.items():
        parts += [level_table(group, by_server, args.max_tokens), ""]
    parts += target_summary(results)
    parts += llama_summary(results)
    parts += rss_table(results)
    notes = fairness_notes(results, args.max_tokens)
    parts += ["Checks:", "", *(notes or ["- nothing to flag"]), ""]
    others = [lv.other_cpu_cores for by_server in results.values() for levels in by_server.values()
              for lv in levels if lv.other_cpu_cores is not None]
    reruns = sum(lv.attempts - 1 for by_server in results.values() for levels in by_server.values() for lv in levels)
    if others:
        parts.append(f"Interference: other processes used at most {max(others):.2f} cores during a measured level "
                     f"(a level is run again, up to {args.retries} times, above {args.max_other_cpu} cores; "
                     f"{reruns} reruns).")
    parts += [f"Load average (1 min, includes the servers and the client) when each server started: "
              f"{'; '.join(loads)}.", ""]
    parts += [
        f"Machine: {info.get('cpu', '?')}, nproc {info['nproc']}; {info['os']}; Python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, openai {info['openai']}.",
        f"CPU flags (lscpu): {info.get('cpu_flags', '?')}.",
        f"OpenMP environment of every server: {info.get('omp_env', '?')}.",
        f"Weights: `{model_dir}` (embedded SmolLM2-135M-Instruct GGUF dequantized to float32, cast by ours and "
        "the peer to the dtype above; llama-server reads the GGUF itself).",
        f"Requests per level: {', '.join(map(str, counts))} (concurrency {args.concurrency}); prompts: "
        f"{len(PROMPTS)} open-ended requests with one system message"
        + ("; every request's question opens with its own number (`--fresh-prompts`), so no prompt repeats and "
           "requests share only the system message" if getattr(args, "fresh_prompts", False) else
           ", sent again and again (the warm-up sends each; a server that reuses a repeated prompt's KV prefills "
           "little)") + ".",
        *server_notes(args, commands),
        f"Command: `{' '.join(['python', 'benchmarks/bench_serving.py', *sys.argv[1:]])}` "
        f"(whole run {elapsed_s / 60:.1f} min).",
    ]
    return "\n".join(parts) + "\n"


def by_name(results: dict[str, dict[str, list[LevelResult]]]) -> dict[str, dict[str, list[LevelResult]]]:
    """``{server: {group: levels}}``: the same results regrouped by server."""
    per_server: dict[str, dict[str, list[LevelResult]]] = {}
    for group, by_server in results.items():
        for name, levels in by_server.items():
            per_server.setdefault(name, {})[group] = levels
    return per_server


def _check(label: str, ours: float, theirs: float, target: float, higher_is_better: bool = True) -> str:
    ratio = ours / theirs if theirs else 0.0
    met = ratio >= target if higher_is_better else ratio <= target
    sign = ">=" if higher_is_better else "<="
    return f"| {label} | {ours:.2f} | {theirs:.2f} | {ratio:.2f}x | {sign} {target:.2f}x | {'yes' if met else 'NO'} |"


def llama_summary(results: dict[str, dict[str, list[LevelResult]]]) -> list[str]:
    """Ours (best dtype per level) against llama-server, with issue 9's targets."""
    per_server = by_name(results)
    if "ours" not in per_server or "llama-server" not in per_server:
        return []
    lines = ["| check (ours at its best dtype) | ours | llama-server | ratio | target | met |",
             "|---|---:|---:|---:|---:|:-:|"]
    for theirs in per_server["llama-server"][GGUF_GROUP]:
        best = best_by_dtype(per_server["ours"], theirs.concurrency)
        if best is None:
            continue
        dtype, ours = best
        target = 1.5 if theirs.concurrency >= RSS_LEVEL else 1.0
        lines.append(_check(f"tok/s at {theirs.concurrency} concurrent ({dtype})", ours.tokens_per_s,
                            theirs.tokens_per_s, target))
        if ours.ttft_p95_s is not None and theirs.ttft_p95_s is not None:
            lines.append(_check(f"TTFT p95 (s) at {theirs.concurrency} concurrent ({dtype})", ours.ttft_p95_s,
                                theirs.ttft_p95_s, 1.0, higher_is_better=False))
    lines += _issue9_extra_checks(per_server)
    return ["### Against llama-server (issue 9)", "", *lines, ""]


def _issue9_extra_checks(per_server: dict[str, dict[str, list[LevelResult]]]) -> list[str]:
    """Issue 9's other two checks: at 16 concurrent >= 2x the peer (best dtype of each), and
    ours faster at 32 concurrent than at 16."""
    lines = []
    ours16 = best_by_dtype(per_server["ours"], RSS_LEVEL)
    peer16 = best_by_dtype(per_server["peer"], RSS_LEVEL) if "peer" in per_server else None
    if ours16 and peer16:
        lines.append(_check(f"tok/s at {RSS_LEVEL} concurrent vs transformers serve ({ours16[0]} / {peer16[0]})",
                            ours16[1].tokens_per_s, peer16[1].tokens_per_s, 2.0))
        if ours16[1].ttft_p95_s is not None and peer16[1].ttft_p95_s is not None:
            lines.append(_check(f"TTFT p95 (s) at {RSS_LEVEL} concurrent vs transformers serve",
                                ours16[1].ttft_p95_s, peer16[1].ttft_p95_s, 1.0, higher_is_better=False))
    ours32 = best_by_dtype(per_server["ours"], 2 * RSS_LEVEL)
    if ours16 and ours32:
        lines.append(_check(f"ours: tok/s at {2 * RSS_LEVEL} concurrent vs at {RSS_LEVEL}", ours32[1].tokens_per_s,
                            ours16[1].tokens_per_s, 1.0 + 1e-9))
    return lines


def _rss_level(levels: list[LevelResult]) -> LevelResult | None:
    """The level at RSS_LEVEL concurrent requests, else the highest level run."""
    exact = [lv for lv in levels if lv.concurrency == RSS_LEVEL]
    return exact[0] if exact else (max(levels, key=lambda lv: lv.concurrency) if levels else None)


def rss_table(results: dict[str, dict[str, list[LevelResult]]]) -> list[str]:
    """Resident memory of each server (its whole process group) right after the 16-concurrent level."""
    rows = []
    for group, by_server in results.items():
        for name, levels in by_server.items():
            level = _rss_level(levels)
            if level is not None and level.rss_mb is not None:
                rows.append(f"| {name} | {group} | {level.concurrency} | {level.rss_mb:.0f} |")
    if not rows:
        return []
    return ["### Memory", "", "| server | dtype / weights | after level (concurrent) | RSS MB |",
            "|---|---|---:|---:|", *rows, ""]


def save(results_dir: Path, stem: str, report: str, args: argparse.Namespace,
         results: dict[str, dict[str, list[LevelResult]]], info: dict[str, str]) -> None:
    """``<stem>.md`` (the report) and ``<stem>.json`` (arguments, machine, every level's numbers)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.md").write_text(report)
    raw = {group: {name: [asdict(level) for level in levels] for name, levels in by_server.items()}
           for group, by_server in results.items()}
    (results_dir / f"{stem}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "results": raw}, indent=2))


def server_notes(args: argparse.Namespace, commands: dict[str, str]) -> list[str]:
    """How each server that ran was started (API keys hidden)."""
    notes = {
        "peer": "Peer: `transformers serve <weights> --continuous-batching --device cpu --dtype <dtype>"
                f"{''.join(' ' + a for a in args.peer_arg)}`.",
        "ours": "Ours: `start_llm_server --config-dir <tmp>` with the package's YAML files and `model.id: <weights>`, "
                "`device: cpu`, `optimizations.dtype: <dtype>`, `parameters.repetition_penalty: 1.0`, `top_p: 1.0`"
                f"{''.join(f', `{item}`' for item in args.ours_set)}.",
        "llama-server": "llama-server: the package's GGUF, one slot per concurrent request, "
                        f"{args.llama_ctx_per_slot} tokens of context per slot, {args.llama_threads} threads.",
    }
    return [line for name in commands for line in (notes.get(name, ""), f"{name} command: `{commands[name]}`")
            if line]
