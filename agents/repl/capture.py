"""Capturing what code prints, bounded, so a runaway print loop cannot exhaust the worker.

`sys.stdout`/`sys.stderr` are replaced once by a router that writes into the current
execution's buffer; threads the code started keep printing into whichever execution is
running (or nowhere, between executions).
"""

from __future__ import annotations

import io
import threading
from collections import deque


class Bounded:
    """Keeps the first and last `cap // 2` characters written and counts the rest."""

    def __init__(self, cap: int):
        self.half = max(1, cap // 2)
        self.head: list[str] = []
        self.head_len = 0
        self.tail: deque[str] = deque()
        self.tail_len = 0
        self.total = 0
        self.lock = threading.Lock()

    def write(self, s: str) -> None:
        with self.lock:
            self.total += len(s)
            if self.head_len < self.half:
                take = s[: self.half - self.head_len]
                self.head.append(take)
                self.head_len += len(take)
                s = s[len(take) :]
            if not s:
                return
            if len(s) >= self.half:
                self.tail.clear()
                s = s[-self.half :]
                self.tail_len = 0
            self.tail.append(s)
            self.tail_len += len(s)
            while self.tail_len > self.half:
                first = self.tail[0]
                over = self.tail_len - self.half
                if len(first) <= over:
                    self.tail.popleft()
                    self.tail_len -= len(first)
                else:
                    self.tail[0] = first[over:]
                    self.tail_len -= over

    @property
    def cut(self) -> int:
        return self.total - self.head_len - self.tail_len

    def text(self) -> str:
        with self.lock:
            head = "".join(self.head)
            tail = "".join(self.tail)
            cut = self.total - len(head) - len(tail)
        if not cut:
            return head + tail
        return f"{head}\n[... {cut:,} characters not kept: over the output cap ...]\n{tail}"


class Router(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr for the life of the worker."""

    def __init__(self, name: str):
        self.name = name
        self.target: Bounded | None = None

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        target = self.target
        if target is not None:
            target.write(s)
        return len(s)

    def flush(self) -> None:
        pass


class NoInput(io.TextIOBase):
    """sys.stdin: the worker's real stdin is its control pipe, and nobody types into it."""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        raise OSError(
            "there is no keyboard in the REPL: input() cannot work here; "
            "ask a human peer with a function call instead, if one is listed in help()"
        )

    readline = read  # type: ignore[assignment]
