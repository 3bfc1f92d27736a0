"""Where an improvement run's time goes, pass by pass, from a server's debug log (issue 20).

The batching engine logs each request's ``queued``, ``admitted`` and ``finished`` lines at debug
level. An improvement turn's passes are requests named ``<turn id>-<pass>`` (``draft``,
``review1``, ``revision1``, ``judge1a``, ...); a plain answer is a request with no pass name.
``improvement_quality.py --server-log FILE`` starts its server at debug level into FILE and adds
this report to its own; it also runs alone on a saved log:

    python benchmarks/improvement_passes.py server.log

Per pass kind: how many ran, their wall time (queued to finished, summed; passes a turn runs
together overlap), tokens generated, prompt tokens prefilled (not found in the prefix cache) and
how they finished. Then the **floor**: for each improvement turn, its draft's wall time plus its
longest revision's, against the plain answer that the benchmark asked just before it. Any pipeline
that writes a full revision after the draft, as issue 20 asks, costs at least that much, even with
free reviews and verdicts.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

PASS_KINDS = ("draft", "review", "revision", "judge")
_LINE = re.compile(
    r"^(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG \S+ \[[^\]]*\] request (?P<id>\S+) "
    r"(?:(?P<queued>queued) \((?P<prompt>\d+) prompt tokens\)"
    r"|(?P<admitted>admitted) \((?P<cached>\d+) prompt tokens cached\)"
    r"|(?P<finished>finished): (?P<reason>\w+) after (?P<tokens>\d+) tokens)"
)
_PASS = re.compile(r"^(?P<turn>.+)-(?P<name>draft|review[12]|revision[12]|judge[12][ab])$")


@dataclass
class Request:
    """One engine request of the log: a plain answer (``name`` empty) or a pass of a turn."""

    turn: str
    name: str
    queued: datetime | None = None
    finished: datetime | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tokens: int = 0
    reason: str = ""

    @property
    def kind(self) -> str:
        return re.sub(r"[12][ab]?$", "", self.name) or "plain"

    @property
    def wall_s(self) -> float:
        if self.queued is None or self.finished is None:
            return 0.0
        return (self.finished - self.queued).total_seconds()


@dataclass
class Turn:
    """A plain answer and the improvement turn that followed it (same prompt in the benchmark)."""

    plain: Request | None
    passes: list[Request] = field(default_factory=list)

    def floor_s(self) -> float:
        """The draft's wall time plus the longest revision's."""
        drafts = [p.wall_s for p in self.passes if p.kind == "draft"]
        revisions = [p.wall_s for p in self.passes if p.kind == "revision"]
        return sum(drafts) + max(revisions, default=0.0)


def parse(lines: list[str]) -> list[Request]:
    """The engine requests of a debug log, in the order they were queued."""
    requests: dict[str, Request] = {}
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            continue
        rid = match["id"]
        if rid not in requests:
            named = _PASS.match(rid)
            requests[rid] = Request(named["turn"], named["name"]) if named else Request(rid, "")
        request = requests[rid]
        stamp = datetime.strptime(match["stamp"], "%Y-%m-%d %H:%M:%S,%f")
        if match["queued"]:
            request.queued, request.prompt_tokens = stamp, int(match["prompt"])
        elif match["admitted"]:
            request.cached_tokens = int(match["cached"])
        else:
            request.finished, request.reason, request.tokens = stamp, match["reason"], int(match["tokens"])
    return list(requests.values())


def turns(requests: list[Request]) -> list[Turn]:
    """Each improvement turn with the plain answer queued just before it."""
    out: list[Turn] = []
    by_turn: dict[str, Turn] = {}
    plain: Request | None = None
    for request in requests:
        if not request.name:
            plain = request
            continue
        if request.turn not in by_turn:
            by_turn[request.turn] = Turn(plain)
            out.append(by_turn[request.turn])
            plain = None
        by_turn[request.turn].passes.append(request)
    return out


def report(requests: list[Request]) -> str:
    """The per-pass table and the floor, in Markdown."""
    rows: dict[str, list[Request]] = defaultdict(list)
    for request in requests:
        rows[request.kind].append(request)
    lines = ["| pass | count | wall (s, summed) | tokens generated | prompt tokens prefilled | finish |",
             "|---|---:|---:|---:|---:|---|"]
    for kind in ("plain", *PASS_KINDS):
        group = rows.get(kind, [])
        if not group:
            continue
        finish = ", ".join(f"{n} {reason}" for reason, n in Counter(r.reason for r in group).most_common())
        lines.append(f"| {kind} | {len(group)} | {sum(r.wall_s for r in group):.1f} | "
                     f"{sum(r.tokens for r in group):,} | "
                     f"{sum(r.prompt_tokens - r.cached_tokens for r in group):,} | {finish} |")
    paired = [t for t in turns(requests) if t.plain is not None and t.plain.wall_s > 0]
    if paired:
        plain_s = sum(t.plain.wall_s for t in paired if t.plain is not None)
        floor_s = sum(t.floor_s() for t in paired)
        ratios = sorted(t.floor_s() / t.plain.wall_s for t in paired if t.plain is not None)
        lines += ["", f"Floor over {len(paired)} turns (draft + longest revision, against the plain answer "
                      f"asked before each): **{floor_s / plain_s:.2f}x** ({floor_s:.1f} s / {plain_s:.1f} s), "
                      f"median {ratios[len(ratios) // 2]:.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> None:
    print(report(parse(Path(sys.argv[1]).read_text(errors="replace").splitlines())))


if __name__ == "__main__":
    main()
