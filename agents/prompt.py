"""What the root model reads: the system prompt, the input's announcement, the code it wrote.

Kept pure (text in, text out) so the loop in `agents/rlm.py` stays about control flow,
and so a test can pin exactly what a model is shown.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass

from channels.messages import Ref

CODE_LANGS = ("python", "py", "repl")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)


@dataclass(frozen=True)
class PeerSpec:
    """How a callable peer is shown to a model: its name, signature and what it is for."""

    name: str
    description: str = ""
    signature: str = "(prompt: str, context=None) -> str"
    target: str | None = None  # the peer called on the bus, when it differs from `name`
    concurrency: int = 64  # calls from one REPL to this peer in flight at once


def code_blocks(reply: str) -> list[str]:
    """The fenced blocks a model meant to run, in order.

    Only `python`, `py` and `repl` fences count: a model quoting JSON or shell output in
    its answer must not have that executed. An unterminated final fence still counts,
    since models cut off by a token limit often stop mid-block.
    """
    blocks = []
    for lang, body in _FENCE.findall(reply):
        if lang.lower() in CODE_LANGS and body.strip():
            blocks.append(body.rstrip())
    return blocks


_PLAIN_FINAL = re.compile(r"^[ \t]*FINAL(_VAR)?\((.*)\)[ \t.]*$", re.M)


def plain_final(reply: str) -> str | None:
    """Code for a `FINAL(...)` written as plain text, outside any code block; None if none.

    Small models often end with a line `FINAL(42)` or `FINAL(The capital is Paris)`. Only
    a line that is the call alone counts (prose that mentions FINAL does not). The argument
    runs as an expression when it is one (so `FINAL(answer)` reads the variable), and is
    taken as text when it is not Python or names nothing defined.
    """
    matches = list(_PLAIN_FINAL.finditer(reply))
    if not matches:
        return None
    found = matches[-1]
    arg = found.group(2).strip()
    if found.group(1):  # FINAL_VAR(name)
        return f"FINAL_VAR({arg.strip(chr(34) + chr(39))!r})"
    if not arg:
        return None
    try:
        ast.parse(arg, mode="eval")
    except SyntaxError:
        return f"FINAL({arg!r})"
    return f"try:\n    __final = ({arg})\nexcept NameError:\n    __final = {arg!r}\nFINAL(__final)"


def literal_final(code: str) -> tuple[bool, object]:
    """(True, value) when `code` is just `FINAL(<a Python literal>)`: an answer that needs
    no REPL to read (the closing turn takes it even when the REPL is gone or out of time)."""
    try:
        tree = ast.parse(code.strip(), mode="exec")
    except SyntaxError:
        return False, None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return False, None
    call = tree.body[0].value
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "FINAL"
        and len(call.args) == 1
        and not call.keywords
    ):
        return False, None
    try:
        return True, ast.literal_eval(call.args[0])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def describe_input(context: object) -> str:
    """Announce the input by kind, size and a preview only, whatever its size."""
    if isinstance(context, Ref):
        return (
            f"`context` is a {context.kind} value of {context.size:,} bytes held in the shared "
            f"store (it loads when your code first uses it). It begins: {context.preview!r}"
        )
    if context is None:
        return "`context` is None: there is no input beyond the request."
    text = context if isinstance(context, str) else repr(context)
    kind = type(context).__name__
    preview = text[:200]
    return f"`context` is a {kind} of length {len(text):,}. It begins: {preview!r}"


def system_prompt(
    peers: Sequence[PeerSpec],
    *,
    instructions: str = "",
    can_spawn: bool = False,
    output: str | None = None,
) -> str:
    lines = [
        "You solve the user's request by writing Python that runs in a persistent REPL.",
        "The input is NOT in this conversation: it is the variable `context` in the REPL.",
        "Look at it with code (len, slicing, search, regular expressions), split it, and",
        "hand pieces to the helpers below; their answers come back as Python values.",
        "",
        "Write code in ```python fenced blocks. Blocks run in order; variables persist",
        "between turns. You see each block's printed output, cut short if it is long, so",
        "print summaries rather than whole texts.",
        "",
        "Functions available in the REPL:",
    ]
    for p in peers:
        desc = f": {p.description}" if p.description else ""
        lines.append(f"- {p.name}{p.signature}{desc}")
        lines.append(
            f"  {p.name}.map(prompts, contexts=None) runs many calls at once and returns the "
            f"answers in order; {p.name}.start(...) returns a handle whose .result() waits."
        )
    if can_spawn:
        lines.append(
            "- rlm(prompt, context=None): a child agent like you, with its own REPL, on a piece"
        )
    lines += [
        "- parallel(h1, h2, ...): wait for several started calls at once.",
        "- store.put(value) -> Ref, store.get(ref); a Ref passes big values without reading them.",
        "- SHOW_VARS(): the variables you have defined.",
        "",
        "When you have the answer, call FINAL(answer) in code, or FINAL_VAR('name') to",
        "answer with a variable. Do not write the answer as plain text: only FINAL ends the run.",
    ]
    if output:
        lines += ["", f"Your FINAL answer must be a value of this type: {output}"]
    if instructions:
        lines += ["", instructions.strip()]
    return "\n".join(lines)


NO_CODE = (
    "Your reply had no ```python block, so nothing ran. Write code to make progress, "
    "and call FINAL(answer) in code when you are done."
)

LAST_TURN = (
    "You have reached a limit ({reason}). This is your last turn: call FINAL(...) now with "
    "your best answer from what you have already found. Calls to other peers are refused "
    "in this turn."
)

WRONG_TYPE = (
    "Your FINAL value does not fit the required type {name}: {errors}. The run goes on: "
    "fix the value and call FINAL again."
)

FOLD_NOTE = (
    "[Turns 1 to {folded} of this run were folded to keep the prompt inside the model's "
    "window. Nothing is lost: every variable you defined is still in the REPL, and "
    "`transcript` there is the list of all turns so far ({{'turn', 'reply', 'output'}} "
    "dicts, oldest first): search it with code for details. Summary of those turns:]\n"
    "{summary}"
)

SUMMARY_REQUEST = (
    "[compaction] Summarise the agent's turns above in at most {words} words, for the agent "
    "itself to carry on: what it found (names, numbers, variables it defined and what they "
    "hold), what failed, and what is left to do. Facts only; no code."
)
