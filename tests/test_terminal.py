"""Ctrl-C at a terminal prompt stops the program at once, on a real pseudo-terminal.

Each test runs the real `council` command with a pty as its controlling terminal (so the
byte 0x03 is Ctrl-C exactly as a person types it), waits for the prompt, types Ctrl-C and
asserts the process and everything it started (the embedded nats-server) are gone within 3 s.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import pid_alive

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "council.cli"]
ASK_ADA = (
    "from council.declare import Council, Human\n"
    "council = Council(entry='ada', peers=[Human('ada')])\n"
)


def _own_terminal() -> None:  # in the child: a new session whose controlling tty is fd 0
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A process on its own pty; `screen` is everything it wrote there."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "xterm", "COUNCIL_LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
            preexec_fn=_own_terminal,
        )
        os.close(slave)
        self.screen = b""

    def wait_for(self, text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, (
                text,
                self.screen.decode(errors="replace"),
            )
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # the child closed its side
                    pass

    def children(self) -> list[int]:
        """Every process below this one (read before it exits: orphans are re-parented)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found += map(int, kids)
            todo += map(int, kids)
        return found

    def ctrl_c_stops_it(self) -> int:
        """Type Ctrl-C; the process and its children are gone within 3 s. Its exit code."""
        below = self.children()
        os.write(self.master, b"\x03")
        started = time.monotonic()
        while self.proc.poll() is None and time.monotonic() - started < 3:
            self._drain()
            time.sleep(0.02)
        code = self.proc.poll()
        assert code is not None, f"still running 3 s after Ctrl-C: {self.screen[-500:]!r}"
        while [p for p in below if pid_alive(p)] and time.monotonic() - started < 3:
            time.sleep(0.02)
        assert not [p for p in below if pid_alive(p)], f"left behind: {below}"
        return code

    def _drain(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            try:
                self.screen += os.read(self.master, 65536)
            except OSError:
                return

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def terminals():
    opened: list[Terminal] = []

    def open_(argv: list[str], env: dict[str, str], cwd: Path) -> Terminal:
        opened.append(Terminal(argv, env, cwd))
        return opened[-1]

    yield open_
    for t in opened:
        t.close()


def test_ctrl_c_at_the_request_prompt_of_council_run(clean_env, tmp_path, terminals):
    (tmp_path / "ask.py").write_text(ASK_ADA)
    t = terminals([*CLI, "run", "ask.py:council", "--no-record"], clean_env, tmp_path)
    t.wait_for(b"request for ada>")
    assert t.ctrl_c_stops_it() in (130, -signal.SIGINT)
    assert b"Traceback" not in t.screen


def test_ctrl_c_at_the_answer_prompt_of_council_run(clean_env, tmp_path, terminals):
    """The human's question is asked in `council run`'s own terminal; Ctrl-C leaves."""
    (tmp_path / "ask.py").write_text(ASK_ADA)
    t = terminals(
        [*CLI, "run", "ask.py:council", "--prompt", "Ship it?", "--no-record"], clean_env, tmp_path
    )
    t.wait_for(b"your answer>")
    assert b"Ship it?" in t.screen
    assert b"from another terminal: council human --name ada --nats " in t.screen
    assert t.ctrl_c_stops_it() in (130, -signal.SIGINT)
    assert b"Traceback" not in t.screen


def test_ctrl_c_at_the_answer_prompt_of_council_human(clean_env, tmp_path, terminals):
    """`council human`, joined with the command `council run` prints, leaves on Ctrl-C (and
    the run it was answering is not disturbed)."""
    (tmp_path / "ask.py").write_text(ASK_ADA)
    run = subprocess.Popen(
        [*CLI, "run", "ask.py:council", "--prompt", "Ship it?", "--no-human", "--no-record"],
        env={**clean_env, "COUNCIL_LOG_LEVEL": "error", "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        join = None
        for line in run.stderr:
            if "answers with: " in line:
                join = line.split("answers with: ", 1)[1].split()
                break
        assert join and join[:2] == ["council", "human"], join
        t = terminals([*CLI, *join[1:]], clean_env, tmp_path)
        t.wait_for(b"your answer>")
        assert b"Ship it?" in t.screen
        assert t.ctrl_c_stops_it() == 0  # a served endpoint stops in order on SIGINT
        assert b"Traceback" not in t.screen
        assert run.poll() is None  # the question still waits for someone to answer it
    finally:
        run.terminate()
        run.wait(30)
