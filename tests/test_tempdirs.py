"""Sessions clean up after themselves: no `council-*` entry is left in the temp dir.

A new user found 509 empty `council-repl-<agent>-log-*` directories after a day. The
sessions here run in a child process whose TMPDIR is a private directory, so every
temp entry Council makes (REPL worker and log dirs, the nats-server and JetStream dirs,
the rights dir) is counted, and nothing else on the machine can add to the count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SESSIONS = 20

SCRIPT = textwrap.dedent(
    """
    import sys
    import anyio
    from agents.models import FunctionModel
    from council.declare import LLM, Agent, Council
    from council.session import Session

    council = Council(
        entry="solver",
        peers=[
            Agent("solver", model="scripted/root", calls=["reader"]),
            LLM("reader", model="scripted/reader"),
        ],
    )
    models = {
        "scripted/root": FunctionModel(
            lambda messages: "```python\\nFINAL(reader('say ok', context=context))\\n```"
        ),
        "scripted/reader": FunctionModel(lambda messages: "ok"),
    }

    async def main(n, record_dir):
        for i in range(n):
            async with Session(council, models=models, record=f"{record_dir}/{i}.jsonl") as s:
                result = await s.ask("go", context="some text", timeout=60)
                assert result.value == "ok", result.value
        print("ran", n)

    anyio.run(main, int(sys.argv[1]), sys.argv[2])
    """
)


def council_entries(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("council-"))


def test_twenty_sessions_leave_no_temp_directory(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    records = tmp_path / "records"
    records.mkdir()
    before = council_entries(tmp)
    env = {**os.environ, "TMPDIR": str(tmp)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(SESSIONS), str(records)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ran {SESSIONS}" in done.stdout
    # The sessions really used the private temp dir (a REPL worker ran in each).
    assert len(list(records.glob("*.jsonl"))) == SESSIONS
    assert council_entries(tmp) == before == []
