"""The reduced side-by-side with the paper's code: council must not be slower than rlms.

`benchmarks/vs_rlms.py` at N=200, one round, a 200k-character context, no memory run:
the sides `rlms` (the `rlms` package from PyPI, in its own venv, which the script creates
on first use with pip: a package registry is needed once) and `council`, each in a fresh
process, against one scripted OpenAI-compatible server that checks every run did all of
its sub-calls. This is the one timed assertion in the suite, and it compares two sides
of the same run rather than a wall time: rlms has a fixed cost of about 0.5 s per
completion and about 1 ms per sub-call, council about a third of that per sub-call
on its lean model path, so a failure here means council got slower, not that the
machine was busy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "vs_rlms.py"


def test_council_is_not_slower_than_rlms_at_n200():
    cmd = [sys.executable, str(SCRIPT), "--sides", "rlms,council", "--ns", "200"]
    cmd += ["--rounds", "1", "--chars", "200000", "--memory-tokens", "0", "--depths", ""]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["errors"] == {}, figures["errors"]
    wall = figures["wall_s"]
    council, rlms = wall["council"]["200"], wall["rlms"]["200"]
    # Both did the same work: every sub-call served, and usage reported as served.
    for side in ("council", "rlms"):
        tokens = figures["tokens"][side]["200"]
        assert tokens["tokens_reported"] == tokens["tokens_served"] > 0
    versions = figures["versions"]
    assert versions["council"]["litellm"] and versions["rlms"]["rlms"]
    assert council < rlms, (
        f"council took {council:.3f}s against rlms {rlms:.3f}s at N=200 in the same run "
        f"(load {figures['load_avg_1m']}); see BENCHMARKS.md for where the time goes"
    )
