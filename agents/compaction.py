"""Folding an agent's older turns into a summary so its prompt stays inside the window.

Pure functions over chat messages; the loop (`agents/rlm.py`) decides when, asks a model
for the summary and keeps the full transcript in the REPL. A prompt is laid out as

    system (identity, peers)  |  user: request + input (+ the fold note)  |  turn pairs

where each turn pair is the model's reply and what its code printed. Folding keeps the
first two verbatim, replaces the older pairs by the note, keeps the latest pairs, and cuts
those latest pairs in the middle only when nothing else brings the prompt under its target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.models import message_tokens
from agents.prompt import FOLD_NOTE
from agents.repl.protocol import clip

Messages = list[dict[str, Any]]
Pair = tuple[dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class Fold:
    """What to fold now: the older pairs (to summarise) and the latest pairs (to keep)."""

    older: list[Pair]
    kept: list[Pair]


def pairs(messages: Messages) -> list[Pair]:
    """The turn pairs after the system prompt and the request."""
    body = messages[2:]
    return [(body[i], body[i + 1]) for i in range(0, len(body) - 1, 2)]


def plan(messages: Messages, head: str, keep: int, target: int, note_chars: int) -> Fold:
    """Keep up to `keep` latest pairs, fewer if even cut down they would not fit `target`
    beside the system prompt, the request and a fold note of `note_chars`; fold the rest."""
    turns = pairs(messages)
    base = [messages[0], {"role": "user", "content": head + "x" * note_chars}]
    room = target - message_tokens(base)
    n = min(keep, len(turns))
    while n > 0 and _fit_pairs(turns[len(turns) - n :], room) is None:
        n -= 1
    cut = len(turns) - n
    return Fold(turns[:cut], turns[cut:])


def folded(
    system: dict[str, Any],
    head: str,
    summary: str,
    n_folded: int,
    kept: list[Pair],
    target: int,
) -> Messages:
    """The new prompt; under `target` tokens unless the system prompt and request alone pass it.

    The kept pairs are cut in the middle when they do not fit whole (`plan` keeps only
    as many as fit cut to a few hundred characters each); the summary is cut last.
    """
    note = FOLD_NOTE.format(folded=n_folded, summary=summary.strip() or "(none)")
    first = {"role": "user", "content": f"{head}\n\n{note}" if n_folded else head}
    base = [system, first]
    fixed = message_tokens(base)
    room = target - fixed
    keep = list(kept)
    while keep:
        out = _fit_pairs(keep, room)
        if out is not None:
            return base + out
        keep = keep[1:]
    if fixed > target and n_folded:  # the summary itself is too long: cut it
        spare = max(200, (target - message_tokens([system, {"role": "user", "content": head}])) * 4)
        first = {"role": "user", "content": f"{head}\n\n{clip(note, spare - 2 - len(head))}"}
        base = [system, first]
    return base


def _fit_pairs(kept: list[Pair], room: int) -> Messages | None:
    flat = [m for pair in kept for m in pair]
    if message_tokens(flat) <= room:
        return flat
    # Cut every message to an equal share of the room, at 4 characters a token.
    share = (room - 4 * len(flat)) * 4 // max(1, len(flat))
    if share < 300:
        return None
    out = [{**m, "content": clip(str(m.get("content", "")), share)} for m in flat]
    return out if message_tokens(out) <= room else None


def turns_text(older: list[Pair], limit_tokens: int) -> str:
    """The older turns as one text for the summariser, cut to fit its window."""
    parts = []
    for i, (reply, output) in enumerate(older, 1):
        parts.append(f"--- turn {i}: the agent wrote\n{reply.get('content', '')}\n")
        parts.append(f"--- turn {i}: its code printed\n{output.get('content', '')}\n")
    text = "\n".join(parts)
    return clip(text, max(400, limit_tokens * 4))


def over(messages: Messages, limit: int) -> bool:
    return message_tokens(messages) > limit


__all__ = ["Fold", "folded", "over", "pairs", "plan", "turns_text"]
