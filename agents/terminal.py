"""Reading a line from the person at the terminal without holding up the event loop.

A `readline()` in a worker thread cannot be interrupted: Ctrl-C cancels the task, but the
process then waits for the thread, that is for Enter. On a terminal, prompt_toolkit reads
the keys on the event loop itself, so a cancelled read is simply gone; Ctrl-C there is raised
again as the SIGINT it would have been without the prompt, so the program stops the way it
stops on Ctrl-C anywhere else (a served peer shuts down in order, `council run` says
"interrupted"). Pipes and in-memory streams, where nobody presses Ctrl-C, keep the plain
read in a thread.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TextIO

import anyio


def _is_terminal(stream: TextIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):  # StringIO, a closed or detached stream
        return False


async def read_line(prompt: str, *, stdin: TextIO | None = None, stdout: TextIO | None = None):
    """Show `prompt` and return the line typed (without its newline); None at end of input.

    On a terminal, Ctrl-C re-raises SIGINT and Ctrl-D ends the input.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not _is_terminal(stdin):
        stdout.write(prompt)
        stdout.flush()
        text = await anyio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
        return text.rstrip("\n") if text else None
    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_input
    from prompt_toolkit.output import create_output

    session: PromptSession[str] = PromptSession(
        input=create_input(stdin), output=create_output(stdout=stdout)
    )
    try:
        return await session.prompt_async(prompt, handle_sigint=False)  # keep our handlers
    except EOFError:
        return None
    except KeyboardInterrupt:
        # The terminal was in raw mode, so the key came as a key, not as the signal: send
        # the signal, and wait here to be cancelled by whoever handles it.
        signal.raise_signal(signal.SIGINT)
        await anyio.sleep_forever()
        raise  # not reached: for a handler that neither cancels nor raises
