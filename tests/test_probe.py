"""``make probe``'s matrix of bad inputs, on the scripted engine: no 5xx, no forged log line (issue 24)."""

from __future__ import annotations

from pathlib import Path

from tests import probe
from tests.probe_cases import CASES


def test_the_probe_matrix_has_at_least_200_cases() -> None:
    assert len(CASES) >= 200
    assert len({case.name for case in CASES}) == len(CASES)  # each named once


def test_every_bad_input_is_answered_without_a_5xx_or_a_forged_log_line(tmp_path: Path) -> None:
    out = tmp_path / "probe.md"
    assert probe.main(["--out", str(out)]) == 0, out.read_text()
    assert "0 x 5xx" in out.read_text() and "0 case(s) with a forged" in out.read_text()
