"""A review council: a chair, two critics with different instructions, an LLM and a human,
over a long document that travels by reference.

The document goes into the shared store once. The chair hands the same reference to
both critics at once, without ever loading the text itself; each critic's REPL loads
it, cuts it up, and asks the reader (an LLM peer) about the pieces that matter to its
own instructions. The chair then asks the human (ada) whether to publish, and answers
with everything it learned.

    python examples/review.py                       # offline: SmolLM2 reads, drivers code
    python examples/review.py --model gpt-4o-mini
    python examples/review.py --replay examples/cassettes/review.jsonl

At a terminal you answer for ada; otherwise (or with --scripted-human) ada's answer is
--human-answer. Offline (--local, the default), SmolLM2-135M does the reading but cannot
write useful code, so the three agents' root model is a scripted driver.
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
    humans_for,
    models_for,
    offline_models,
    parser,
    say,
    session_options,
    system_of,
    usage_line,
)

from council.declare import LLM, Agent, Council, Human, Limits
from council.session import Session

REQUEST = "Review this design proposal. Should we publish it as it stands?"
CASSETTE = CASSETTES / "review.jsonl"
HUMAN_ANSWER = "No: fix the latency figures first, then publish."

CHAIR = "You chair a review."
NUMBERS = "You check the numbers."
CLARITY = "You judge clarity."

council = Council(
    entry="chair",
    description="two critics with different briefs, a reader, and a person who decides",
    peers=[
        Agent(
            "chair",
            model=DRIVER,
            calls=["numbers", "clarity", "ada"],
            description="runs a review and reports the verdict",
            instructions=(
                f"{CHAIR} Hand the document (`context`, a reference: pass it on without "
                "reading it) to both critics at once, then ask ada whether to publish, "
                "telling her what the critics found. FINAL a dict with keys numbers, "
                "clarity, human and publish (a bool from ada's answer)."
            ),
            limits=Limits(iterations=6, seconds=900),
        ),
        Agent(
            "numbers",
            model=DRIVER,
            calls=["reader"],
            description="checks that the figures in a document agree with each other",
            instructions=(
                f"{NUMBERS} Find every place that states the p95 latency, have `reader` "
                "extract each figure from a short window, keep only figures the window "
                "really contains, and FINAL a dict: figures (section title -> figure) and "
                "consistent (bool)."
            ),
            limits=Limits(iterations=6, seconds=600),
        ),
        Agent(
            "clarity",
            model=DRIVER,
            calls=["reader"],
            description="finds the hardest sentences of a document and proposes plainer ones",
            instructions=(
                f"{CLARITY} Find the two longest sentences, have `reader` rewrite each in "
                "plain English, and FINAL a list of {sentence, words, suggestion} dicts."
            ),
            limits=Limits(iterations=6, seconds=600),
        ),
        LLM(
            "reader",
            model=LOCAL,
            description="reads a short passage (context) and answers a question about it",
            concurrency=4,
        ),
        Human("ada", description="the editor; decides whether the proposal is published"),
    ],
)

# -- the document ---------------------------------------------------------------------------

TOPICS = (
    "the queue",
    "the cache",
    "the scheduler",
    "each worker",
    "the gateway",
    "the index",
    "the billing job",
)
VERBS = ("reads from", "writes to", "waits on", "retries against", "reports to", "drains")
ENDS = (
    "once a minute",
    "under load",
    "during a deploy",
    "when the disk fills",
    "at night",
    "on every request",
)
LONG_SENTENCES = (
    "In the event that the primary region should for whatever reason become unavailable "
    "for a period of time that exceeds the threshold which has been configured by the "
    "operators in the deployment manifest, the gateway will, after a short delay that is "
    "itself configurable, begin to route the traffic that it would otherwise have sent "
    "there towards whichever secondary region it currently considers to be healthiest.",
    "It should be noted that the retention of the intermediate results that are produced "
    "by the billing job, which is something that has in the past been a source of some "
    "confusion among the teams that depend on them, is governed by a policy whose details "
    "are set out at greater length in the appendix that accompanies this proposal.",
)
SECTIONS = (
    (
        "Summary",
        "We propose to move the request path onto the new queue. "
        "With it, the p95 latency is 40 ms, down from 130 ms today.",
    ),
    ("Background", ""),
    ("Design", LONG_SENTENCES[0]),
    ("Storage", ""),
    (
        "Results",
        "In the load test the p95 latency was 90 ms at peak traffic, measured over six hours.",
    ),
    ("Billing", LONG_SENTENCES[1]),
    ("Risks", ""),
    ("Rollout", ""),
    ("Appendix", ""),
)


def document(seed: int = 3, sentences_per_section: int = 64) -> str:
    """A design proposal of about 30 KB, more than SmolLM2 can read at once (4,096 tokens). Two sections disagree on the p95 latency, and two
    sentences are far longer than the rest. Deterministic per seed."""
    rng = random.Random(seed)
    parts = ["# Proposal: a queue in front of the request path\n"]
    for title, planted in SECTIONS:
        filler = [
            f"{rng.choice(TOPICS).capitalize()} {rng.choice(VERBS)} {rng.choice(TOPICS)} "
            f"{rng.choice(ENDS)}."
            for _ in range(sentences_per_section)
        ]
        if planted:
            filler.insert(rng.randrange(0, 6), planted)
        parts.append(f"## {title}\n\n" + " ".join(filler) + "\n")
    return "\n".join(parts)


# -- the scripted drivers (offline only) -----------------------------------------------------

CHAIR_1 = """
# The document is a reference: hand it on to both critics at once, unread.
numbers_job = numbers.start("Do the p95 latency figures agree across the document?", context=context)
clarity_job = clarity.start("Which sentences are hardest to read? Suggest plainer ones.", context=context)
found_numbers, found_clarity = parallel(numbers_job, clarity_job)
agree = "they agree" if found_numbers["consistent"] else "they disagree"
print("numbers:", found_numbers["figures"], f"({agree})")
print("clarity:", found_clarity)
"""

CHAIR_2 = """
figures = ", ".join(f"{k}: {v} ms" for k, v in found_numbers["figures"].items())
question = (
    f"The critics report. Latency figures: {figures} "
    f"({agree}). "
    f"{len(found_clarity)} sentences need rewriting, the longest has "
    f"{max((c['words'] for c in found_clarity), default=0)} words. "
    "Publish the proposal as it stands? Answer yes or no, and why."
)
verdict = ada(question, context=context)
print("ada:", verdict)
"""

CHAIR_3 = """
FINAL({
    "numbers": found_numbers,
    "clarity": found_clarity,
    "human": verdict,
    "publish": verdict.strip().lower().startswith("yes"),
})
"""

NUMBERS_1 = """
import re
sections = re.split(r"\\n(?=## )", context)
spots = [(s.splitlines()[0].lstrip("# ").strip(), m.start(), s)
         for s in sections for m in re.finditer(r"p95 latency", s)]
print(len(sections), "sections;", len(spots), "mention the p95 latency:", [t for t, _, _ in spots])
windows = [s[i: i + 60] for _, i, s in spots]
answers = reader.map(
    "What p95 latency, in ms, does this text report? Answer with the number only.",
    contexts=windows, max_tokens=20, temperature=0,
)
print(answers)
"""

NUMBERS_2 = """
claims = {}
for (title, _, _), window, answer in zip(spots, windows, answers):
    said = set(re.findall(r"\\b\\d+\\b", window))  # whole numbers: not the 95 of "p95"
    figures = [int(n) for n in re.findall(r"\\b\\d+\\b", str(answer)) if n in said]
    if figures:
        claims[title] = figures[0]
print(claims)
FINAL({"figures": claims, "consistent": len(set(claims.values())) <= 1})
"""

CLARITY_1 = """
import re
sentences = [s.strip() for s in re.split(r"(?<=[.!?])\\s+", context) if s.strip()]
longest = sorted(sentences, key=lambda s: len(s.split()), reverse=True)[:2]
print(len(sentences), "sentences; the longest have", [len(s.split()) for s in longest], "words")
plain = reader.map(
    "Rewrite this sentence in plain English, in at most 20 words.",
    contexts=longest, max_tokens=48, temperature=0,
)
print(plain)
"""

CLARITY_2 = """
FINAL([
    {"sentence": s[:100] + "...", "words": len(s.split()), "suggestion": p.strip()}
    for s, p in zip(longest, plain)
])
"""

SCRIPTS = {
    CHAIR: (CHAIR_1, CHAIR_2, CHAIR_3),
    NUMBERS: (NUMBERS_1, NUMBERS_2),
    CLARITY: (CLARITY_1, CLARITY_2),
}


def script(turn: int, request: str, messages: list[dict[str, Any]]) -> str:
    """One driver for the three agents: each agent's instructions say which it is."""
    system = system_of(messages)
    for role, turns in SCRIPTS.items():
        if role in system:
            return code(turns[min(turn, len(turns)) - 1])
    raise ValueError("the review driver does not know this agent")


def drivers() -> dict[str, Any]:
    """`council run ... --models examples/review.py:drivers`: the scripted root; the reader
    runs on SmolLM2."""
    return offline_models(script, scripted_reader=False)


def scripted() -> dict[str, Any]:
    """`council run ... --models examples/review.py:scripted`: no model at all (a stand-in
    reader that picks figures out of its context)."""
    return offline_models(script, scripted_reader=True)


# -- running it ------------------------------------------------------------------------------


@dataclass
class Outcome:
    value: Any
    session: str
    document_chars: int

    @property
    def ok(self) -> bool:
        """The numbers critic caught the disagreement; the clarity critic found the two
        long sentences; the human's answer decided `publish`."""
        v = self.value
        if not isinstance(v, dict):
            return False
        nums = v.get("numbers") or {}
        figures = nums.get("figures") or {}
        clarity = v.get("clarity") or []
        return (
            figures.get("Summary") == 40
            and figures.get("Results") == 90
            and not nums.get("consistent")
            and len(clarity) == 2
            and all(c["words"] > 50 for c in clarity)
            and bool(v.get("publish")) == str(v.get("human", "")).strip().lower().startswith("yes")
        )


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
    text = document()
    say(args, models.label)
    prompts = PromptLog(
        ["chair-model", "numbers-model", "clarity-model"], out=None if args.quiet else out
    )
    humans = humans_for(args, models.council, {"ada": [args.human_answer]})
    async with Session(
        models.council,
        nats_url=nats_url,
        models=models.models,
        humans=humans,
        timeout=args.timeout,
        **session_options(args),
    ) as s:
        await s.start(partial(prompts.run, s.client))
        ref = await (await s.client.store()).put(text)
        say(args, f"the document is {len(text):,} characters, stored as {ref!r}")
        result = await s.ask(REQUEST, context=ref, timeout=args.timeout)
    outcome = Outcome(result.value, result.session, len(text))
    v = result.value
    if args.quiet:
        print(v)
    elif isinstance(v, dict):
        nums = v.get("numbers") or {}
        agree = "they agree" if nums.get("consistent") else "they disagree"
        say(args, f"numbers: p95 latency by section {nums.get('figures')} ({agree})")
        for c in v.get("clarity") or []:
            say(args, f"clarity: a {c['words']}-word sentence -> {c['suggestion']!r}")
        say(args, f"ada: {v.get('human')!r}  => publish: {bool(v.get('publish'))}")
    else:
        say(args, "answer:", v)
    say(args, f"{usage_line(result)}; {clock} in all")
    return outcome


def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--human-answer", default=HUMAN_ANSWER, help="ada's answer when scripted")
    p.add_argument(
        "--scripted-human",
        action="store_true",
        help="answer for ada with --human-answer even at a terminal",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    outcome = anyio.run(run, options(argv))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
