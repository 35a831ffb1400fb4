"""Attaching a person is one step: the session hands out the exact `council human` command,
with rights on naming that human's own credential file (0600), never a password."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import anyio
import pytest

from channels.errors import CouncilError
from council.declare import Agent, Council, Human
from council.session import Session

pytestmark = pytest.mark.anyio


def _private_password(cred: Path) -> str:
    """The file is the owner's alone, holds only the human's endpoint user: its password."""
    assert cred.stat().st_mode & 0o777 == 0o600
    assert cred.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in cred.parent.glob("*.cred.json")] == ["ada-desk.cred.json"]
    return json.loads(cred.read_text())["password"]


async def test_the_printed_command_attaches_the_human_and_its_file_goes_with_the_session(
    clean_env, tmp_path
):
    council = Council(entry="ada", peers=[Human("ada"), Agent("bot", model="m", calls=["ada"])])
    got: dict = {}
    async with Session(council) as s:  # embedded server, rights on: one user per peer
        assert s.rights is not None
        join = s.human_command("ada")
        assert s.human_command("ada") == join  # asked twice, one file
        argv = shlex.split(join)
        assert argv[:2] == ["council", "human"]
        cred = Path(argv[argv.index("--rights") + 1])
        assert _private_password(cred) not in join  # a path, never the password
        with pytest.raises(CouncilError, match="not a human peer"):
            s.human_command("bot")

        async def ask() -> None:
            got["answer"] = (await s.ask("Ship it?", timeout=60)).value

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            env = {**clean_env, "COUNCIL_LOG_LEVEL": "error"}
            human = await anyio.open_process(
                [sys.executable, "-m", "council.cli", *argv[1:]], env=env, cwd=tmp_path
            )
            try:
                await human.stdin.send(b"ship it\n")
                with anyio.fail_after(60):
                    while "answer" not in got:
                        await anyio.sleep(0.05)
            finally:
                human.terminate()
                await human.wait()
        assert got["answer"] == "ship it"
    assert not await anyio.Path(cred.parent).exists()  # the session's end removes it


async def test_without_rights_the_command_needs_no_file(nats_server):
    council = Council(entry="ada", peers=[Human("ada")])
    async with Session(council, rights=False) as s:
        join = s.human_command("ada")
    assert "--rights" not in join
    assert join.endswith(f"--session {s.session}") and f"--nats {s.url}" in join
