"""Needle in a haystack: an agent finds one sentence in 10k to 10M tokens of text without
the text ever entering a model's prompt.

The haystack goes into the shared store; the agent's root model is told only its kind,
size and first characters. Its code searches the text in the REPL and hands a few small
windows to a sub-LLM ("reader"); it checks the reader's answers against the windows and
ends with FINAL. The size of every root prompt is printed as it is sent: it stays the
same whatever --tokens is.

    python examples/needle.py                        # offline: SmolLM2 reads, a driver codes
    python examples/needle.py --tokens 10000000      # 10M tokens (40 MB in the store)
    python examples/needle.py --model gpt-4o-mini    # a real model writes the code
    python examples/needle.py --replay examples/cassettes/needle.jsonl

Offline (--local, the default), SmolLM2-135M is a real model doing the reading, but it
cannot write useful code, so the root is a scripted driver: a function that writes the
code a capable model would. With --model, the model writes its own code.
"""

from __future__ import annotations

import argparse
import random
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
    mode,
    models_for,
    offline_models,
    parser,
    say,
    session_options,
    usage_line,
)

from agents.models import estimate_tokens
from council.declare import LLM, Agent, Council, Limits
from council.session import Session

QUESTION = "What is the secret code for the vault? Answer with the number only."
CASSETTE = CASSETTES / "needle.jsonl"
CASSETTE_TOKENS = 20_000  # the recording's haystack size (kept small: it is saved with it)
SEED = 7

council = Council(
    entry="finder",
    description="finds one fact in a text far larger than any prompt",
    peers=[
        Agent(
            "finder",
            model=DRIVER,
            calls=["reader"],
            description="answers a question about a very long text",
            instructions=(
                "The text in `context` can be millions of characters long: never print it "
                "whole. Search it with code, give `reader` only short windows (under 2,000 "
                "characters) around likely places, check its answers against the windows, "
                "and FINAL the answer alone."
            ),
            limits=Limits(iterations=8, seconds=600),
        ),
        LLM(
            "reader",
            model=LOCAL,
            description="reads a short passage (context) and answers a question about it",
            concurrency=4,
        ),
    ],
)

# -- the haystack ---------------------------------------------------------------------------

WORDS = (
    "the river stone green market slowly window paper garden blue old mill winter bread "
    "lamp road quiet letter north field rain copper bell tower song harbour cloud sister "
    "morning candle orchard wheel velvet kettle meadow lantern willow pebble thread"
).split()
DECOYS = (
    "Nobody in the village knows the secret of the old mill.",
    "The secret garden behind the tower stays closed all winter.",
    "She kept the secret recipe for the copper kettle soup in a blue tin.",
)


def haystack(tokens: int, seed: int = SEED) -> tuple[str, str]:
    """(text of about `tokens` tokens, the code hidden in it). Deterministic per seed.

    Filler sentences hold no digits; three decoy sentences mention a secret without a
    number; one sentence holds the code.
    """
    rng = random.Random(seed)
    secret = str(rng.randrange(10_000, 100_000))
    pool = [
        " ".join(rng.choices(WORDS, k=rng.randrange(6, 14))).capitalize() + "." for _ in range(4096)
    ]
    avg = sum(len(s) + 1 for s in pool) / len(pool)
    n = max(8, int(tokens * 4 / avg))
    sentences = rng.choices(pool, k=n)
    needle = f"The secret code for the vault is {secret}."
    for s in (*DECOYS, needle):
        sentences.insert(rng.randrange(1, len(sentences)), s)
    return " ".join(sentences), secret


# -- the scripted driver (offline only) ------------------------------------------------------

TURN_1 = """
print(type(context).__name__, f"{len(context):,} characters")
print(context[:200])
"""

TURN_2 = """
import re
spots = [m.start() for m in re.finditer(r"secret", context, flags=re.IGNORECASE)]
print(f"{len(spots)} places mention 'secret'")
windows = [context[max(0, i - 300): i + 300] for i in spots[:16]]
answers = reader.map(QUESTION, contexts=windows, max_tokens=20, temperature=0)
for i, a in enumerate(answers):
    print(i, repr(a)[:80])
"""

TURN_3 = """
found = []
for window, answer in zip(windows, answers):
    said = set(re.findall(r"\\d+", window))
    # trust only a number the passage really holds: small models make numbers up
    found += [n for n in re.findall(r"\\d{4,}", str(answer)) if n in said]
print("checked against the text:", found)
FINAL(found[0] if found else "not found")
"""


def script(turn: int, request: str, messages: list[dict[str, Any]]) -> str:
    if turn == 1:
        return code(TURN_1, "First, what does the input look like?")
    if turn == 2:
        return code(
            f"QUESTION = {request!r}\n" + TURN_2,
            "Too big to read. Search it, and let the reader look at the few matching windows.",
        )
    return code(TURN_3, "Keep the answers the windows confirm.")


def drivers() -> dict[str, Any]:
    """`council run ... --models examples/needle.py:drivers`: the scripted root; the reader
    runs on SmolLM2."""
    return offline_models(script, scripted_reader=False)


def scripted() -> dict[str, Any]:
    """`council run ... --models examples/needle.py:scripted`: no model at all (a stand-in
    reader that picks figures out of its context)."""
    return offline_models(script, scripted_reader=True)


# -- running it ------------------------------------------------------------------------------


@dataclass
class Outcome:
    value: Any
    expected: str
    tokens: int
    largest_prompt: int  # characters of the largest root prompt
    session: str

    @property
    def found(self) -> bool:
        return str(self.value).strip() == self.expected


async def run(
    args: argparse.Namespace,
    *,
    nats_url: str | None = None,
    out: Any = sys.stdout,
    models: Any = None,
) -> Outcome:
    """Generate the haystack, ask the council, report; `models` from `models_for` (opened
    here when not given)."""
    if models is None:
        async with models_for(args, council, script) as m:
            return await run(args, nats_url=nats_url, out=out, models=m)
    clock = Stopwatch()
    text, secret = haystack(args.tokens, args.seed)
    size = estimate_tokens(text)
    say(args, models.label)
    say(args, f"haystack: {len(text):,} characters (~{size:,} tokens), made in {clock}")
    prompts = PromptLog(["finder-model"], out=None if args.quiet else out)
    async with Session(
        models.council,
        nats_url=nats_url,
        models=models.models,
        timeout=args.timeout,
        **session_options(args),
    ) as s:
        await s.start(partial(prompts.run, s.client))
        ref = await (await s.client.store()).put(text)  # by reference: the call carries a Ref
        say(args, f"stored as {ref!r}; asking {council.entry!r}: {QUESTION}")
        result = await s.ask(QUESTION, context=ref, timeout=args.timeout)
    outcome = Outcome(result.value, secret, size, prompts.largest, result.session)
    say(
        args,
        f"answer: {result.value!r} (the hidden code is {secret}: "
        f"{'found' if outcome.found else 'NOT found'})",
    )
    say(
        args,
        f"the largest root prompt was {prompts.largest:,} characters, "
        f"{prompts.largest / max(1, len(text)):.3%} of the input; {usage_line(result)}; "
        f"{clock} in all",
    )
    if args.quiet:
        print(result.value)
    return outcome


def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="haystack size in tokens, at four characters a token (default 100,000)",
    )
    p.add_argument("--seed", type=int, default=SEED, help="which haystack (and code)")
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = CASSETTE_TOKENS if mode(args) == "replay" else 100_000
    if not 1_000 <= args.tokens <= 20_000_000:
        p.error("--tokens must be between 1,000 and 20,000,000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    outcome = anyio.run(run, args)
    return 0 if outcome.found else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
