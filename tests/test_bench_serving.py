"""The serving benchmark's plumbing (no server started): which servers a run plans, the llama-server
binary check, hidden keys, memory measurement, and the report's llama-server and memory tables."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_serving  # noqa: E402

from servebench import peers, report  # noqa: E402
from servebench.client import LevelResult  # noqa: E402
from servebench.servers import process_group_rss_mb  # noqa: E402

WEIGHTS = peers.Weights(gguf=Path("/models/m.gguf"), hf_folder=Path("/models/hf"))


def level(concurrency: int, tokens_per_s: float, ttft_p95_s: float, rss_mb: float | None = None) -> LevelResult:
    return LevelResult(concurrency=concurrency, requests=concurrency, errors=0, full_length=concurrency,
                       completion_tokens=64 * concurrency, wall_s=1.0, tokens_per_s=tokens_per_s,
                       ttft_p50_s=ttft_p95_s, ttft_p95_s=ttft_p95_s, itl_p50_s=0.05, prompt_tokens_mean=30.0,
                       tokens_from_usage=True, rss_mb=rss_mb)


def fake_binary(folder: Path) -> Path:
    binary = folder / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_llama_server_runs_only_when_a_binary_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(peers.LLAMA_SERVER_ENV, raising=False)
    args = bench_serving.parse_args(["--dtype", "bfloat16", "--concurrency", "1,16"])
    runs = bench_serving.plan(args, WEIGHTS, tmp_path, peers.llama_server_binary(args.llama_server))
    assert [(group, name) for group, name, _ in runs] == [("bfloat16", "ours"), ("bfloat16", "peer")]

    monkeypatch.setenv(peers.LLAMA_SERVER_ENV, str(fake_binary(tmp_path)))
    runs = bench_serving.plan(args, WEIGHTS, tmp_path, peers.llama_server_binary(args.llama_server))
    assert [name for _, name, _ in runs] == ["ours", "peer", "llama-server"]  # ours before the peer's 14 GB
    peer_first = bench_serving.parse_args(["--dtype", "bfloat16", "--order", "peer-first"])
    assert [name for _, name, _ in bench_serving.plan(peer_first, WEIGHTS, tmp_path, None)] == ["peer", "ours"]
    spec = runs[-1][2](8080)
    command = spec.command
    assert command[command.index("-m") + 1] == "/models/m.gguf"  # the package's own GGUF
    assert command[command.index("-np") + 1] == "16"  # one slot per request of the highest level
    assert command[command.index("-c") + 1] == str(16 * args.llama_ctx_per_slot)
    assert command[command.index("-t") + 1] == str(os.cpu_count())
    assert spec.api_key not in peers.describe_command(spec) and "<key>" in peers.describe_command(spec)


def test_a_missing_llama_server_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="llama-server binary not found"):
        peers.llama_server_binary(str(tmp_path / "nope"))


def test_rss_of_this_process_group_is_measured() -> None:
    rss = process_group_rss_mb(os.getpgid(0))
    assert rss is not None and rss > 10  # this Python process alone holds more than 10 MB
    assert process_group_rss_mb(2**22 + 12345) is None  # no such group


def test_report_compares_with_llama_server_and_shows_memory() -> None:
    results = {
        "bfloat16": {"ours": [level(1, 20.0, 0.1), level(16, 300.0, 0.5, rss_mb=1100.0)]},
        report.GGUF_GROUP: {"llama-server": [level(1, 100.0, 0.05), level(16, 180.0, 1.7, rss_mb=500.0)]},
    }
    lines = "\n".join(report.llama_summary(results))
    assert "| tok/s at 16 concurrent (bfloat16) | 300.00 | 180.00 | 1.67x | >= 1.50x | yes |" in lines
    assert "| tok/s at 1 concurrent (bfloat16) | 20.00 | 100.00 | 0.20x | >= 1.00x | NO |" in lines
    assert "| TTFT p95 (s) at 16 concurrent (bfloat16) | 0.50 | 1.70 | 0.29x | <= 1.00x | yes |" in lines
    memory = "\n".join(report.rss_table(results))
    assert "| ours | bfloat16 | 16 | 1100 |" in memory and "| llama-server | gguf | 16 | 500 |" in memory


def test_report_checks_issue_9_against_the_peer_and_rising_throughput() -> None:
    results = {
        "bfloat16": {"ours": [level(16, 300.0, 0.5), level(32, 280.0, 0.9)],
                     "peer": [level(16, 180.0, 0.6), level(32, 190.0, 1.3)]},
        report.GGUF_GROUP: {"llama-server": [level(16, 180.0, 0.3)]},
    }
    lines = "\n".join(report.llama_summary(results))
    assert "vs transformers serve (bfloat16 / bfloat16) | 300.00 | 180.00 | 1.67x | >= 2.00x | NO |" in lines
    assert "| TTFT p95 (s) at 16 concurrent vs transformers serve | 0.50 | 0.60 | 0.83x | <= 1.00x | yes |" in lines
    assert "| ours: tok/s at 32 concurrent vs at 16 | 280.00 | 300.00 | 0.93x | >= 1.00x | NO |" in lines


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="needs lscpu (util-linux)")
def test_every_results_file_records_the_cpu_and_its_flags(tmp_path: Path) -> None:
    info = report.machine_info()
    assert info.get("cpu") and len(info.get("cpu_flags", "").split()) > 5  # lscpu's Flags line
    args = argparse.Namespace(max_tokens=64, retries=0, max_other_cpu=0.25, concurrency="1", peer_arg=[],
                              ours_set=[], llama_ctx_per_slot=1024, llama_threads=2)
    results = {"bfloat16": {"ours": [level(1, 20.0, 0.1, rss_mb=700.0)]}}
    text = report.render_report(args, results, info, Path("/w"), 1.0, [], {"ours": "start_llm_server"}, [2])
    report.save(tmp_path, "run", text, args, results, info)
    assert info["cpu_flags"] in (tmp_path / "run.md").read_text()
    assert info["cpu_flags"] in (tmp_path / "run.json").read_text()


def test_fresh_prompts_never_repeat_within_a_run_and_share_only_the_system_message() -> None:
    from servebench.client import PROMPTS, PromptNumbers, messages_for

    numbers = PromptNumbers()
    spans = [numbers.take(n) for n in (1, 32, 4, 32, 64)]  # warm-up, burst, then the levels
    assert spans == [0, 1, 33, 37, 69] and numbers.next == 133
    chats = [messages_for(i, fresh=True) for i in range(numbers.next)]
    assert len({chat[1]["content"] for chat in chats}) == numbers.next  # every question its own
    assert {chat[0]["content"] for chat in chats} == {messages_for(0)[0]["content"]}
    repeated = [messages_for(i)[1]["content"] for i in range(2 * len(PROMPTS))]
    assert len(set(repeated)) == len(PROMPTS)  # the default sends the same prompts again


def test_the_ceiling_table_shows_the_share_against_each_bandwidth_probe_and_their_mean() -> None:
    """The streaming read is taken before and after the servers; a noisy host moves it by half, so
    the report gives the share against each probe and the ceiling from their mean."""
    from servebench.ceiling import Ceiling, ceiling_rows

    limit = Ceiling(bandwidth_gbs=30.0, threads=2, ours_weight_bytes=100_000_000, kv_bytes_per_position=0,
                    gguf_tensor_bytes=100_000_000, quantization="auto", later_bandwidth_gbs=50.0)
    text = "\n".join(ceiling_rows(limit, {"ours": 10.0}, {"ours": 200.0}))
    assert "before / after the servers: **30.0** / **50.0** GB/s" in text and "mean, 40.0 GB/s" in text
    # 200 tok/s x 100 MB = 20 GB/s: 67 % of the first probe, 40 % of the second, 50 % of their mean (ceiling 400)
    assert "| ours | 100.0 | 0.00 | 400 | 200.0 | 50% | 67% / 40% |" in text
    alone = "\n".join(ceiling_rows(Ceiling(30.0, 2, 100_000_000, 0, 100_000_000, "auto"), {}, {"ours": 200.0}))
    assert "before the servers: **30.0** GB/s" in alone and "| 67% | 67% |" in alone
    assert "weights' size" not in alone  # no such read taken: no column, no note


def test_the_ceiling_table_adds_the_share_against_a_read_of_the_weights_size() -> None:
    """Where the last-level cache holds part of the weights, a server can pass the 1 GiB ceiling; the
    table then also gives the share against a read as large as the weights."""
    from servebench.ceiling import Ceiling, ceiling_rows

    limit = Ceiling(30.0, 2, 100_000_000, 0, 100_000_000, "auto", weights_sized_gbs=40.0)
    text = "\n".join(ceiling_rows(limit, {}, {"ours": 330.0, "llama-server": 100.0}))
    # 330 tok/s x 100 MB = 33 GB/s: 110 % of the 1 GiB read, 82 % of the weights-sized one
    assert "| ours | 100.0 | 0.00 | 300 | 330.0 | 110% | 110% | 82% |" in text
    assert "| llama-server | 100.0 | 0.00 | 300 | 100.0 | 33% | 33% | 25% |" in text
    assert "share against a read of the weights' size |" in text and "reached **40.0** GB/s" in text


def test_the_bandwidth_only_probe_prints_the_streaming_read_as_json(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """What ``measure_bandwidth``'s child prints after the servers: one JSON line, a positive GB/s."""
    import json

    from servebench import ceiling

    monkeypatch.setattr(ceiling, "STREAM_BYTES", 1 << 22)  # 4 MiB: the arithmetic, not the machine
    ceiling._child(["--bandwidth-only", "1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"bandwidth_gbs"} and printed["bandwidth_gbs"] > 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux /proc")
def test_the_cpu_meter_counts_a_servers_children_as_the_server() -> None:
    """A server that serves from a child process (``transformers serve`` does) must not look like
    another program using the CPU: the meter counts the server's whole process group."""
    import signal
    import subprocess
    import time

    from servebench.client import CpuMeter
    from servebench.servers import process_group_cpu_ticks

    child = "import time\nstart = time.time()\nwhile time.time() - start < 5: pass"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    server = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    try:
        time.sleep(1.5)  # the child burns CPU; the parent only waits for it
        hz = os.sysconf("SC_CLK_TCK")
        group, parent_alone = process_group_cpu_ticks(server.pid), CpuMeter._process_ticks(server.pid)
        assert group - parent_alone >= 0.3 * hz, (group, parent_alone)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_between_servers_the_benchmark_waits_until_the_host_stops_stealing_cpu() -> None:
    """After a big server exits the hypervisor steals our vCPUs for a while; the next server starts
    only once 5 windows in a row show no steal and an idle machine, or after the maximum wait."""
    from servebench.servers import wait_until_settled

    hz = os.sysconf("SC_CLK_TCK")
    steal_per_window = [0.0, 0.0, 0.3, 0.0, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # cores stolen per 1 s
    readings, busy, steal = [(0, 0)], 0, 0
    for cores in steal_per_window:
        busy, steal = busy + round(cores * hz), steal + round(cores * hz)
        readings.append((busy, steal))
    feed = iter(readings)
    slept: list[float] = []
    waited = wait_until_settled(60.0, read=lambda: next(feed), sleep=slept.append)
    assert waited == 11.0 and len(slept) == 11  # quiet windows between steal do not count; then 5 in a row

    idle = iter([(0, 0)] * 100)
    assert wait_until_settled(60.0, min_s=30.0, read=lambda: next(idle), sleep=lambda _: None) == 30.0

    always_busy = iter([(i * hz, 0) for i in range(100)])  # a whole core busy: never quiet
    assert wait_until_settled(5.0, read=lambda: next(always_busy), sleep=lambda _: None) == 5.0
    assert wait_until_settled(5.0, read=lambda: None, sleep=lambda _: None) == 0.0  # no /proc: no wait
