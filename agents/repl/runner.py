"""Running one cell of model-written code in a persistent namespace.

No bus and no threads here: this is the part a model's code actually touches, kept
plain so its behaviour (trailing values, trimmed tracebacks, FINAL) is easy to pin down.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import linecache
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Literal

import channels
from agents.repl.protocol import clip

# Frames from these places are our machinery, not the model's code: a model can do nothing
# with them, and they would crowd out the frames it can act on.
_MACHINERY = (
    *(
        os.path.dirname(p) + os.sep
        for p in (
            __file__,
            channels.__file__,
            concurrent.futures.__file__,
            asyncio.__file__,
        )
    ),
    threading.__file__,
)


class FinalSignal(BaseException):
    """Raised by FINAL/FINAL_VAR to end the cell; BaseException so `except Exception` lets it by."""


@dataclass
class Outcome:
    status: Literal["ok", "error"]
    value: str | None = None
    error: str | None = None
    final: bool = False
    failed: BaseException | None = None  # what ended the code, when it was an exception


def parse(code: str, filename: str) -> ast.Module:
    return ast.parse(code, filename=filename, mode="exec")


def needs_context(tree: ast.AST, passthrough: set[str]) -> bool:
    """Whether the cell reads `context`, other than handing it straight on to a peer.

    `critic("summarise", context=context)` passes the input along without reading it, so a
    40 MB input that is only forwarded is never loaded. Anything else that loads the name,
    including a function body that might run later, counts as a read.
    """
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == "context"):
            continue
        if not isinstance(node.ctx, ast.Load):
            continue
        if _forwarded(node, parents, passthrough):
            continue
        return True
    return False


def _forwarded(node: ast.Name, parents: dict[ast.AST, ast.AST], passthrough: set[str]) -> bool:
    """`peer(prompt, context)`, `peer(prompt, context=context)`, `peer.start(...)` the same
    way, or `FINAL(context)`: the name is handed on as it is, a Ref when it is one."""
    parent = parents.get(node)
    if isinstance(parent, ast.keyword) and parent.arg == "context":
        call = parents.get(parent)
        position = None
    elif isinstance(parent, ast.Call) and node in parent.args:
        call = parent
        position = parent.args.index(node)
    else:
        return False
    if not isinstance(call, ast.Call):
        return False
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr == "start":
        func = func.value
    if not isinstance(func, ast.Name):
        return False
    if func.id == "FINAL":
        return position in (None, 0)
    return func.id in passthrough and position in (None, 1)


def run(code: str, namespace: dict[str, Any], *, filename: str, value_cap: int) -> Outcome:
    """Execute `code` in `namespace`; the value of a trailing expression comes back as a repr."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = parse(code, filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec")
        tail = compile(last, filename, "eval") if last is not None else None
    except (SyntaxError, ValueError, OverflowError) as e:  # ValueError: null bytes in source
        # Only the error itself: the frames are the compiler's, never the model's.
        return Outcome("error", error="".join(traceback.format_exception_only(e)).rstrip("\n"))
    try:
        exec(body, namespace)
        if tail is None:
            return Outcome("ok")
        value = eval(tail, namespace)
    except FinalSignal:
        return Outcome("ok", final=True)
    except SystemExit as e:
        return Outcome(
            "error",
            error=format_error(e) + "\nSystemExit: the code tried to exit; the REPL keeps running, "
            "call FINAL(answer) to finish instead",
        )
    except BaseException as e:
        return Outcome("error", error=format_error(e), failed=e)
    if value is None:
        return Outcome("ok")
    namespace["_"] = value
    try:
        shown = repr(value)
    except Exception as e:
        shown = f"<repr failed: {type(e).__name__}: {e}>"
    return Outcome("ok", value=clip(shown, value_cap))


def format_error(exc: BaseException) -> str:
    """A traceback with our own frames dropped, chained causes kept."""
    te = traceback.TracebackException.from_exception(exc, capture_locals=False)
    _trim(te, set())
    return "".join(te.format()).rstrip("\n")


def _trim(te: traceback.TracebackException, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    kept = [f for f in te.stack if not f.filename.startswith(_MACHINERY)]
    te.stack = traceback.StackSummary.from_list(kept)
    for nxt in (te.__cause__, te.__context__):
        if nxt is not None:
            _trim(nxt, seen)
