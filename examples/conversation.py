"""A conversation whose memory lives in a variable, not in the prompt.

Every request carries `args={"conversation": "trip"}`, so the agent keeps one REPL for
the whole conversation and the earlier turns in the store, where its code sees them as
the variable `history` (a list of {"request", "answer"} dicts). The root prompt holds
only the current request: it stays the same size at turn 14 as at turn 1. Later
questions need facts from the first turns; the agent's code searches `history` and has
the reader (an LLM peer) answer from the turns it found.

    python examples/conversation.py                     # offline: SmolLM2 reads, a driver codes
    python examples/conversation.py --model gpt-4o-mini
    python examples/conversation.py --replay examples/cassettes/conversation.jsonl

Offline (--local, the default), SmolLM2-135M answers from the turns the code found; it
cannot write useful code, so the root is a scripted driver that searches `history` by
keywords, as a capable model's code would.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from _shared import (
    CASSETTES,
    DRIVER,
    LOCAL,
    PromptLog,
    Stopwatch,
    code,
    guarded,
    models_for,
    offline_models,
    parser,
    say,
    session_options,
    usage_line,
)

from council.declare import LLM, Agent, Council, Limits
from council.session import Session

CASSETTE = CASSETTES / "conversation.jsonl"
CONVERSATION = "trip"

# (what the user says, what a right answer must contain; None for a plain statement)
TURNS: list[tuple[str, tuple[str, ...] | None]] = [
    ("Hi! My name is Priya, and I am planning a trip to Lisbon.", None),
    ("My flight is TP 1351, leaving on 14 March at 07:40.", None),
    ("I am allergic to peanuts, so keep that in mind for restaurants.", None),
    ("My hotel budget is 120 euros a night.", None),
    ("I prefer window seats on trains.", None),
    ("I will take the metro from the airport to the centre.", None),
    ("I want to see the tiles museum and the castle.", None),
    ("Please remember that I do not drink coffee after noon.", None),
    ("My sister Ana joins me on the second day.", None),
    ("I will carry one small backpack, nothing else.", None),
    ("What is my flight number?", ("1351",)),
    ("Which food am I allergic to?", ("peanut",)),
    ("How much is my hotel budget a night?", ("120",)),
    ("Who joins me on the second day?", ("Ana",)),
]

council = Council(
    entry="assistant",
    description="a travel assistant with a long memory held outside its prompt",
    peers=[
        Agent(
            "assistant",
            model=DRIVER,
            calls=["reader"],
            description="a travel assistant in a long conversation",
            instructions=(
                "For a plain statement, FINAL a short acknowledgement. For a question, "
                "search `history` with code for the earlier turns that bear on it, ask "
                "`reader` the question with those turns as its context, and FINAL its "
                "answer."
            ),
            limits=Limits(iterations=5, seconds=300),
        ),
        LLM(
            "reader",
            model=LOCAL,
            description="answers a question from a few earlier messages (context)",
        ),
    ],
)

# -- the scripted driver (offline only) ------------------------------------------------------

SEARCH = """
import re
try:
    history
except NameError:  # a request outside a conversation (`council run --prompt ...`)
    history = []
STOP = {"what", "which", "does", "much", "with", "that", "this", "have", "from", "about"}
words = {w for w in re.findall(r"[a-z]+", REQUEST.lower()) if len(w) > 3} - STOP
relevant = [
    turn["request"] for turn in history
    if words & set(re.findall(r"[a-z]+", turn["request"].lower()))
]
print(f"{len(history)} earlier turns; {len(relevant)} share a word with {sorted(words)}:")
for r in relevant:
    print("  ", r)
notes = "\\n".join(f"Earlier the user said: {r}" for r in relevant) or "Nothing relevant was said."
answer = reader(REQUEST, context=notes, max_tokens=40, temperature=0)
print("reader:", answer)
"""


def script(turn: int, request: str, messages: list[dict[str, Any]]) -> str:
    if not request.rstrip().endswith("?"):
        return code('FINAL("Noted.")', "A statement: nothing to look up.")
    if turn == 1:
        return code(f"REQUEST = {request!r}\n" + SEARCH, "Look in `history` for what was said.")
    return code("FINAL(answer.strip())")


def drivers() -> dict[str, Any]:
    """`council run ... --models examples/conversation.py:drivers`: the scripted root; the reader
    runs on SmolLM2."""
    return offline_models(script, scripted_reader=False)


def scripted() -> dict[str, Any]:
    """`council run ... --models examples/conversation.py:scripted`: no model at all (a stand-in
    reader that picks figures out of its context)."""
    return offline_models(script, scripted_reader=True)


# -- running it ------------------------------------------------------------------------------


@dataclass
class Exchange:
    request: str
    answer: Any
    needs: tuple[str, ...] | None
    prompt_chars: int

    @property
    def ok(self) -> bool:
        if self.needs is None:
            return isinstance(self.answer, str) and bool(self.answer)
        return all(n.lower() in str(self.answer).lower() for n in self.needs)


@dataclass
class Outcome:
    exchanges: list[Exchange]
    session: str

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.exchanges)


async def run(
    args: argparse.Namespace,
    *,
    nats_url: str | None = None,
    out: Any = sys.stdout,
    models: Any = None,
) -> Outcome:
    if models is None:
        async with models_for(args, council, script) as m:
            return await run(args, nats_url=nats_url, out=out, models=m)
    clock = Stopwatch()
    say(args, models.label)
    prompts = PromptLog(["assistant-model"])  # printed below, one line per request
    exchanges: list[Exchange] = []
    turns = TURNS[: args.turns]
    async with Session(
        models.council,
        nats_url=nats_url,
        models=models.models,
        timeout=args.timeout,
        **session_options(args),
    ) as s:
        await s.start(partial(prompts.run, s.client))
        for n, (request, needs) in enumerate(turns, 1):
            seen = len(prompts.sizes)
            result = await s.ask(request, args={"conversation": CONVERSATION}, timeout=args.timeout)
            first = prompts.sizes[seen][2] if len(prompts.sizes) > seen else 0
            exchanges.append(Exchange(request, result.value, needs, first))
            mark = "" if needs is None else ("  [right]" if exchanges[-1].ok else "  [WRONG]")
            say(args, f"{n:2}. user: {request}")
            say(args, f"    assistant: {result.value}{mark}   (root prompt {first:,} chars)")
    outcome = Outcome(exchanges, s.session)
    sizes = [e.prompt_chars for e in exchanges]
    say(
        args,
        f"{sum(e.ok for e in exchanges if e.needs)} of {sum(1 for e in exchanges if e.needs)} "
        f"questions about early turns answered right; the first root prompt of a request "
        f"ranged {min(sizes):,}-{max(sizes):,} characters over {len(exchanges)} turns; "
        f"{clock} in all",
    )
    if args.quiet:
        for e in exchanges:
            print(e.answer)
    say(args, f"last request: {usage_line(result)}")
    return outcome


def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument(
        "--turns", type=int, default=len(TURNS), help=f"how many turns (at most {len(TURNS)})"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    outcome = anyio.run(run, options(argv))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
