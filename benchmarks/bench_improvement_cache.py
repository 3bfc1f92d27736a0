#!/usr/bin/env python3
"""Improvement mode with prefix caching on vs off (issue 19's target: wall time at least 1.5x shorter).

Two servers of this project run at once, the package's configuration (the embedded model) with
only ``server.engine.prefix_caching`` different, and get the same requests **interleaved**: each
prompt goes to one, then the other (the order alternates), so both see the same machine load.
Each request is the spec's ``POST /chat/blocking`` with ``"improvement": true`` (the spec's
passes: draft, review, revision, judge ...), greedy (``temperature: 0``), ``--max-new-tokens``
per pass. Prompts:

- ``short``: the first ``--short`` prompts of ``benchmarks/data/improvement_prompts.json``;
- ``context``: ``--context`` questions asked after a ~1,000-token history (reference notes sent
  as an earlier user turn, as a chat client resends its history): the passes repeat it.

Reported per prompt: wall time on / off, their ratio, and the cached-token share of the caching
server (the ``llm_server_prefix_cache_hits_total`` / ``..._queries_total`` deltas of its
``/metrics`` over that request: prompt tokens served from the cache / prompt tokens looked up).
Also whether the two replies are the same (greedy: they should be). Run from the repository root::

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/bench_improvement_cache.py

Results (Markdown + JSON) go to ``benchmarks/results/improvement_cache_<time>.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_multiturn import notes  # noqa: E402

from servebench import peers, report  # noqa: E402
from servebench.servers import REPO_ROOT, ServerSpec, free_port, running  # noqa: E402

log = logging.getLogger("bench_improvement_cache")
DATA = REPO_ROOT / "benchmarks" / "data" / "improvement_prompts.json"
CONTEXT_QUESTIONS = ("Which note has the most sites? Answer briefly.",
                     "Summarise the notes about deserts in one sentence.",
                     "Which region is mentioned most often?")  # fmt: skip
MODES = ("on", "off")


def write_config(folder: Path, port: int, caching: bool, max_new_tokens: int) -> None:
    """The package's YAML files with this port, a key from the environment, and the caching switch."""
    import yaml

    shutil.copytree(REPO_ROOT / "llm_server" / "yaml_files", folder, dirs_exist_ok=True)
    path = folder / "server_config.yaml"
    document = yaml.safe_load(path.read_text())
    server = document["server"]
    server.update({"port": port, "api_key": peers.API_KEY_ENV, "open_access": False})
    server.setdefault("engine", {})["prefix_caching"] = caching
    limits = server.setdefault("limits", {})
    limits["max_new_tokens"] = max(max_new_tokens, int(limits.get("max_new_tokens") or 0))
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def server_spec(workdir: Path, mode: str, max_new_tokens: int) -> ServerSpec:
    folder = workdir / f"config-{mode}"
    port = free_port()
    write_config(folder, port, mode == "on", max_new_tokens)
    return dataclasses.replace(peers.ours_spec(folder, port), name=f"ours-cache-{mode}")


def prompts(short: int, context: int) -> list[dict[str, Any]]:
    """The request bodies (without the per-run fields), each with a name."""
    data = json.loads(DATA.read_text())
    chosen = [*data["checkable"], *data.get("open", [])][:short]
    bodies = [{"name": item["id"], "prompt": item["prompt"], "history": []} for item in chosen]
    history = [{"role": "user", "content": notes("geography")}, {"role": "assistant", "content": "Noted."}]
    bodies += [{"name": f"context-{i + 1}", "prompt": q, "history": history}
               for i, q in enumerate(CONTEXT_QUESTIONS[:context])]
    return bodies


def prefix_counters(base: str) -> tuple[float, float]:
    """(queries, hits) in tokens, from the server's /metrics."""
    import requests

    text = requests.get(f"{base}/metrics", timeout=60).text
    found = {name: float(value) for name, value in
             re.findall(r"^llm_server_prefix_cache_(queries|hits)_total (\S+)$", text, re.MULTILINE)}
    return found.get("queries", 0.0), found.get("hits", 0.0)


def ask(spec: ServerSpec, body: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """One improvement request: wall time, reply, and the prefix-cache counters' deltas."""
    import requests

    base = spec.base_url.removesuffix("/v1")
    payload = {"prompt": body["prompt"], "history": body["history"], "improvement": True,
               "temperature": 0, "max_new_tokens": max_new_tokens}
    queries, hits = prefix_counters(base)
    started = time.perf_counter()
    response = requests.post(f"{base}/chat/blocking", json=payload, headers={"X-API-Key": spec.api_key}, timeout=1800)
    wall = time.perf_counter() - started
    queries_after, hits_after = prefix_counters(base)
    reply = response.json().get("reply") if response.status_code == 200 else None
    return {"wall_s": wall, "status": response.status_code, "reply": reply,
            "queried_tokens": queries_after - queries, "cached_tokens": hits_after - hits}


def measure(specs: dict[str, ServerSpec], bodies: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for index, body in enumerate(bodies):
        order = MODES if index % 2 == 0 else MODES[::-1]
        row: dict[str, Any] = {"name": body["name"]}
        for mode in order:
            row[mode] = ask(specs[mode], body, max_new_tokens)
            log.info("%s %s: %.1f s, %d/%d tokens cached", body["name"], mode, row[mode]["wall_s"],
                     row[mode]["cached_tokens"], row[mode]["queried_tokens"])
        rows.append(row)
    return rows


def _share(cached: float, queried: float) -> str:
    return f"{cached / queried:.0%}" if queried else "—"


def render(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| prompt | wall off (s) | wall on (s) | off / on | cached share (on) | same reply |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        on, off = row["on"], row["off"]
        ratio = off["wall_s"] / on["wall_s"]
        lines.append(f"| {row['name']} | {off['wall_s']:.1f} | {on['wall_s']:.1f} | {ratio:.2f}x | "
                     f"{_share(on['cached_tokens'], on['queried_tokens'])} | "
                     f"{'yes' if on['reply'] == off['reply'] else 'no'} |")
    for label, group in (("short", [r for r in rows if not r["name"].startswith("context")]),
                         ("context", [r for r in rows if r["name"].startswith("context")]), ("all", rows)):
        if not group:
            continue
        off_s, on_s = sum(r["off"]["wall_s"] for r in group), sum(r["on"]["wall_s"] for r in group)
        cached, queried = sum(r["on"]["cached_tokens"] for r in group), sum(r["on"]["queried_tokens"] for r in group)
        lines.append(f"| **total, {label}** | {off_s:.1f} | {on_s:.1f} | **{off_s / on_s:.2f}x** | "
                     f"{_share(cached, queried)} | |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--short", type=int, default=3, help="prompts from improvement_prompts.json")
    parser.add_argument("--context", type=int, default=2, help="questions after a ~1,000-token history")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="new tokens per pass")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    workdir = Path(tempfile.mkdtemp(prefix="bench_improvement_cache."))
    try:
        with ExitStack() as stack:
            specs = {mode: server_spec(workdir, mode, args.max_new_tokens) for mode in MODES}
            for spec in specs.values():
                stack.enter_context(running(spec, workdir))
            rows = measure(specs, prompts(args.short, args.context), args.max_new_tokens)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info = report.machine_info()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (f"bench_improvement_cache.py {' '.join(sys.argv[1:])} — {when}, "
              f"the package's config (embedded model), /chat/blocking improvement, greedy, {args.max_new_tokens} new "
              f"tokens per pass, CPU: {info.get('cpu', '?')}, interleaved on / off")
    text = render(rows, header)
    print("\n" + text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"improvement_cache_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    (args.results_dir / f"{stem}.md").write_text(text + "\n")
    (args.results_dir / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    log.info("saved %s.{md,json} in %s", stem, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
