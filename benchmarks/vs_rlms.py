"""Side by side with the paper's code (`rlms`), against the floor, on one scripted model.

One scripted, instant OpenAI-compatible server (benchmarks/openai_stub.py) answers
every side. The task: a root model that, in its first turn, writes code fanning out N
sub-calls over slices of `context` (in each framework's own REPL dialect), then
answers. N = 100, 500, 1000 by default; 16 model calls in flight everywhere. Every side runs in a
fresh process per round, rounds interleaved (rotating order) so machine noise hits
all sides alike; wall times are medians over rounds. The sides:

- raw-aiohttp        N hand-written POSTs on one aiohttp session, 16 in flight: the real
                     floor of any client (build the JSON body, parse the answer);
- floor              N direct calls with the openai client (AsyncOpenAI), 16 in flight,
                     in our venv (the openai major version litellm pins);
- floor:rlms-venv    the same, with the newer openai client of the rlms venv. The floor
                     is the faster of the two at each N (the stricter baseline);
- litellm:<variant>  the floor's N calls through litellm: `ours` (agents.models.LiteLLMModel
                     with a price, on its lean path, as the council side uses it),
                     `ours_full` (the same with lean=False: litellm.acompletion),
                     `ours_unpriced`, `ours_sdk`; and litellm.acompletion called directly:
                     `default`, `priced`, `lean` (litellm's own aiohttp handler for openai/),
                     `hosted_vllm`, `lean_unpriced`;
- rlms               the paper's package: `RLM(...).completion(context)`, local REPL,
                     `llm_query_batched` (its handler runs 16 at a time), in its own venv;
- council            a Council session: agent `root` whose code calls `llm.map`, the `llm`
                     peer bounded at 16 in flight (see council_once), asked once the
                     session is up, its warm REPL worker included;
- council:cold       the same, asked the moment the session has started, while the agent's
                     warm REPL worker is still booting (the first request of a session);
- council:litellm    the same with both models on litellm's full path (lean=False);
- council:sdk        the same on the OpenAI SDK route (lean=False and
                     EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER=false);
- council:function   the same with a plain function answering the sub-calls (no HTTP,
                     no litellm): the framework's own cost. Not a comparison, a diagnosis;
- council:depthD     (`--depths`, run after the other sides) the same 512 leaf calls
                     through D levels of agents that hand halves of their input to child
                     agents (see depth_once); the target is depth 3 within 1.5x depth 1.

Every run is checked against the server's own count (N sub-calls, one root turn) and
the answer text. Peak memory uses a 10M-token context (~40 MB of text): the peak of
the summed RSS of the framework's process tree (its REPL worker and embedded
nats-server included), sampled every 20 ms; the scripted server is not counted.

rlms lives only in benchmarks/.venv-rlms (created on first use with `pip install rlms
openai`); it is never a dependency of this package. The last printed line is one JSON
object with every figure.

    .venv/bin/python benchmarks/vs_rlms.py            # the full run (10-15 minutes)
    .venv/bin/python benchmarks/vs_rlms.py --quick    # N=20,50, small context, 1 round

Only the standard library is imported at the top: the same file runs as a worker under
the rlms venv, where our packages are not installed. The floor and litellm sides use
plain asyncio on purpose: the floor is what a user of the openai client would write,
with no layer of ours in between.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RLMS_VENV = HERE / ".venv-rlms"
RLMS_PINS = ("rlms==0.1.3", "openai==3.57.0")
RLMS_PYTHON = RLMS_VENV / "bin" / "python"
OUR_PYTHON = Path(sys.executable)

CONCURRENCY = 16
PROMPT = "Split the input, ask the sub-model about every slice, and report how many answered."
TOKEN_CHARS = 4  # the stub counts four characters a token; so does the context size below


def _our_packages() -> None:
    """Make channels/agents/council importable when run as a script from anywhere."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# -- the input --------------------------------------------------------------------------------


def make_context(chars: int) -> str:
    """Deterministic prose-like text of exactly `chars` characters, built in well under a second."""
    rng = random.Random(7)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(2000)
    ]
    lines = []
    for i in range(4000):
        lines.append(f"{i:05d} " + " ".join(rng.choice(words) for _ in range(12)) + ".\n")
    block = "".join(lines)
    reps = chars // len(block) + 1
    return (block * reps)[:chars]


def sub_prompts(context: str, n: int) -> list[str]:
    """What the scripted rlms root sends per slice; the floor and litellm send the same."""
    step = -(-len(context) // n)
    return ["SUB " + context[i * step : (i + 1) * step] for i in range(n)]


def stub_stats(stub: str, run: str) -> dict:
    with urllib.request.urlopen(f"{stub}/stats/{run}", timeout=10) as r:
        return json.loads(r.read())


def check_run(stub: str, run: str, n: int, *, roots: int) -> dict:
    """The work was really done: n sub-calls, and the root answered in its first turn."""
    s = stub_stats(stub, run)
    if s.get("sub", 0) != n or s.get("root", 0) != roots or s.get("extra_root_turns", 0):
        raise RuntimeError(f"run {run}: expected {n} sub-calls and {roots} root turn(s), got {s}")
    return s


# -- the sides: each makes one timed run and says what it saw ----------------------------------


def floor_once(stub: str, run: str, n: int, context: str) -> dict:
    """N direct chat.completions calls from the openai client, 16 in flight."""
    import asyncio

    from openai import AsyncOpenAI

    prompts = sub_prompts(context, n)

    async def go() -> dict:
        client = AsyncOpenAI(base_url=f"{stub}/floor/{n}/{run}/v1", api_key="stub", max_retries=0)
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(p: str) -> str:
            async with sem:
                r = await client.chat.completions.create(
                    model="sub", messages=[{"role": "user", "content": p}]
                )
                return r.choices[0].message.content or ""

        t, c = time.perf_counter(), time.process_time()
        out = await asyncio.gather(*(one(p) for p in prompts))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        assert len(out) == n and all(out)
        await client.close()
        return {"wall": wall, "cpu": cpu}

    res = asyncio.run(go())
    check_run(stub, run, n, roots=0)
    return res


def raw_once(stub: str, run: str, n: int, context: str) -> dict:
    """The real floor: N hand-written POSTs on one aiohttp session, 16 in flight, no SDK.

    It builds the JSON body, reads the JSON answer and takes the text, nothing else: what
    any client must at least do per call.
    """
    import asyncio

    import aiohttp

    prompts = sub_prompts(context, n)
    url = f"{stub}/floor/{n}/{run}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer stub"}

    async def go() -> dict:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with aiohttp.ClientSession() as session:

            async def one(p: str) -> str:
                body = json.dumps({"model": "sub", "messages": [{"role": "user", "content": p}]})
                async with sem, session.post(url, data=body, headers=headers) as r:
                    return json.loads(await r.read())["choices"][0]["message"]["content"]

            t, c = time.perf_counter(), time.process_time()
            out = await asyncio.gather(*(one(p) for p in prompts))
            wall, cpu = time.perf_counter() - t, time.process_time() - c
        assert len(out) == n and all(out)
        return {"wall": wall, "cpu": cpu}

    res = asyncio.run(go())
    check_run(stub, run, n, roots=0)
    return res


LITELLM_VARIANTS = {
    # name: (model prefix, price registered, litellm's own HTTP handler for openai/,
    #        through agents.models.LiteLLMModel)
    "default": ("openai", False, False, False),
    "priced": ("openai", True, False, False),
    "lean": ("openai", True, True, False),
    "hosted_vllm": ("hosted_vllm", True, False, False),
    "lean_unpriced": ("openai", False, True, False),
    "ours": ("openai", True, None, True),
    "ours_unpriced": ("openai", False, None, True),
    "ours_sdk": ("openai", True, False, True),
}
# `ours*` variants: LiteLLMModel's lean path (its default), or `lean=False`: litellm.acompletion.
OURS_LEAN = {"ours": True, "ours_unpriced": True, "ours_sdk": False, "ours_full": False}
LITELLM_VARIANTS["ours_full"] = ("openai", True, None, True)
# What the scripted models cost, when a variant tells litellm (a listed model has a price).
PRICES = {"input_cost_per_token": 1e-7, "output_cost_per_token": 4e-7}
# litellm sends openai/ models through the OpenAI SDK unless this is set; with it, through
# its own aiohttp-based handler (as it already does for hosted_vllm/ and most providers).
# agents.models.LiteLLMModel switches it on by default (None below: leave it to LiteLLMModel).
LEAN_ENV = "EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER"


def litellm_once(stub: str, run: str, n: int, context: str, variant: str) -> dict:
    """The floor's N calls through litellm.acompletion (in one of the variants above)."""
    import asyncio

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    prefix, priced, lean, ours = LITELLM_VARIANTS[variant]
    if lean is not None:
        os.environ[LEAN_ENV] = "true" if lean else "false"
    model = f"{prefix}/sub-{variant}"
    if priced and not ours:
        litellm.register_model(
            {
                model: {
                    **PRICES,
                    "litellm_provider": prefix,
                    "mode": "chat",
                }
            }
        )
    base = f"{stub}/floor/{n}/{run}/v1"
    prompts = sub_prompts(context, n)
    if ours:
        _our_packages()
        from agents.models import LiteLLMModel

        prices = PRICES if priced else {}
        wrapped = LiteLLMModel(
            model, api_base=base, api_key="stub", lean=OURS_LEAN[variant], **prices
        )

        async def call(p: str) -> str:
            return (await wrapped.complete([{"role": "user", "content": p}])).text

    else:

        async def call(p: str) -> str:
            r = await litellm.acompletion(
                model=model,
                messages=[{"role": "user", "content": p}],
                api_base=base,
                api_key="stub",
                max_retries=0,
            )
            return r.choices[0].message.content or ""

    async def go() -> dict:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(p: str) -> str:
            async with sem:
                return await call(p)

        t, c = time.perf_counter(), time.process_time()
        out = await asyncio.gather(*(one(p) for p in prompts))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        assert len(out) == n and all(out)
        return {"wall": wall, "cpu": cpu}

    res = asyncio.run(go())
    check_run(stub, run, n, roots=0)
    return res


def rlms_once(stub: str, run: str, n: int, context: str) -> dict:
    """The paper's package: one RLM completion, local REPL, sub-calls via llm_query_batched.

    Its handler runs a batch 16 at a time (LMHandler's batch_max_concurrent default).
    """
    from rlm import RLM

    base = f"{stub}/rlms/{n}/{run}/v1"
    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": "root", "base_url": base, "api_key": "stub"},
        other_backends=["openai"],
        other_backend_kwargs=[{"model_name": "sub", "base_url": base, "api_key": "stub"}],
        environment="local",
        max_iterations=3,
    )
    t = time.perf_counter()
    out = rlm.completion(context, root_prompt=PROMPT)
    wall = time.perf_counter() - t
    answer = str(out.response)
    if not answer.startswith(f"{n} answers"):
        raise RuntimeError(f"rlms answered {answer[:200]!r}")
    s = check_run(stub, run, n, roots=1)
    u = out.usage_summary
    return {
        "wall": wall,
        "tokens_reported": u.total_input_tokens + u.total_output_tokens,
        "tokens_served": s["prompt_tokens"] + s["completion_tokens"],
    }


# ---------------------------------------------------------------------------------------------
# THE COUNCIL SIDE. One function; everything else in this file is harness.
# ---------------------------------------------------------------------------------------------


def council_once(
    stub: str,
    run: str,
    n: int,
    context: str,
    *,
    sdk: bool = False,
    function_sub: bool = False,
    cold: bool = False,
    lean: bool = True,
) -> dict:
    """A Council session answering the same request: agent `root` (root model `openai/root`)
    whose code calls the `llm` peer (`openai/sub`, 16 in flight) with `llm.map`.

    Only `Session.ask` is timed (it puts a big context into the store first, then the
    agent takes a REPL worker, runs the model's code, fans out, answers): the session's
    own start (embedded nats-server, peers) is set-up, like constructing a client.
    The scripted models get a price, as any model in litellm's table has one (an
    unpriced model costs litellm a slow failed lookup per call). LiteLLMModel routes
    openai/ models through litellm's own HTTP handler; `sdk` opts out of that, as a user
    can, and so measures the OpenAI SDK route.
    `function_sub` answers the sub-calls with a plain function instead of a model over
    HTTP: what is left is the framework's own cost (bus, peers, REPL fan-out).
    An agent keeps one REPL worker booted ahead of need, started with the session; a
    session that has been up for a moment has it. `cold` asks without waiting for it,
    as the very first request of a fresh session does.
    """
    import anyio

    if sdk:
        os.environ[LEAN_ENV] = "false"

    _our_packages()
    from agents.limits import Limits
    from agents.models import FunctionModel, LiteLLMModel
    from council.declare import LLM, Agent, Council
    from council.session import Session

    base = f"{stub}/council/{n}/{run}/v1"
    models = {
        name: LiteLLMModel(name, api_base=base, api_key="stub", lean=lean, **PRICES)
        for name in ("openai/root", "openai/sub")
    }
    if function_sub:
        models["openai/sub"] = FunctionModel(lambda messages: "ok done", name="sub")
    council = Council(
        entry="root",
        peers=[
            Agent("root", model="openai/root", calls=["llm"], limits=Limits(iterations=3)),
            LLM("llm", model="openai/sub", concurrency=CONCURRENCY, description="a sub-model"),
        ],
    )

    async def go() -> dict:
        async with Session(council, models=models) as session:
            if not cold:
                await warm_workers_up(session)
            t = time.perf_counter()
            result = await session.ask(PROMPT, context=context, timeout=600)
            wall = time.perf_counter() - t
        return {"wall": wall, "answer": str(result.value), "tokens": result.usage.tokens}

    out = anyio.run(go)
    if not out["answer"].startswith(f"{n} answers"):
        raise RuntimeError(f"council answered {out['answer'][:200]!r}")
    s = check_run(stub, run, 0 if function_sub else n, roots=1)
    return {
        "wall": out["wall"],
        "tokens_reported": out["tokens"],
        "tokens_served": s["prompt_tokens"] + s["completion_tokens"],
    }


def depth_once(stub: str, run: str, depth: int, context: str) -> dict:
    """The same 512 leaf calls reached through `depth` levels of agents (see openai_stub).

    Agent `root` may spawn child agents like itself (`rlm`); at depth 1 it fans out to `llm`
    itself, at depth 2 it hands 2 halves to 2 children that fan out 256 each, at depth 3 the
    children hand 2 halves each to 4 grandchildren that fan out 128 each (7 agents). Every
    agent of the tree takes a REPL worker: this measures what a child agent's request costs.
    The timed request is the session's second: the first, untimed, sizes the agent's pool
    of warm workers (agents/repl/pool.py).
    """
    import anyio

    sys.path.insert(0, str(HERE))
    from openai_stub import FAN, LEAVES

    _our_packages()
    from agents.limits import Limits
    from agents.models import LiteLLMModel
    from council.declare import LLM, Agent, Council
    from council.session import Session

    base = f"{stub}/depth/{depth}/{run}/v1"
    models = {
        name: LiteLLMModel(name, api_base=base, api_key="stub", **PRICES)
        for name in ("openai/root", "openai/sub")
    }
    council = Council(
        entry="root",
        peers=[
            Agent(
                "root",
                model="openai/root",
                calls=["llm"],
                can_spawn=depth > 1,
                limits=Limits(iterations=3, depth=depth),
            ),
            LLM("llm", model="openai/sub", concurrency=CONCURRENCY, description="a sub-model"),
        ],
    )

    async def go() -> dict:
        async with Session(council, models=models) as session:
            # One untimed request first: the agent's pool learns how many workers a tree
            # holds at once and boots them after its replies, as a long-running council's does.
            await warm_workers_up(session)
            first = await session.ask(PROMPT, context=context, timeout=600)
            await warm_workers_up(session)
            t = time.perf_counter()
            result = await session.ask(PROMPT, context=context, timeout=600)
            wall = time.perf_counter() - t
        return {"wall": wall, "answer": str(result.value), "first": str(first.value)}

    out = anyio.run(go)
    for answer in (out["first"], out["answer"]):
        if not answer.startswith(f"{LEAVES} answers"):
            raise RuntimeError(f"council at depth {depth} answered {answer[:200]!r}")
    agents = sum(FAN**level for level in range(depth))
    check_run(stub, run, 2 * LEAVES, roots=2 * agents)
    return {"wall": out["wall"], "agents": agents}


async def warm_workers_up(session, limit: float = 20.0) -> None:
    """Wait (at most `limit` s) until every agent of the session has its spare REPL worker:
    session start returns once every peer serves; an agent boots its spare just after."""
    import anyio

    from agents.rlm import RLMAgent

    with anyio.move_on_after(limit):
        for agent in session.peers.values():
            if isinstance(agent, RLMAgent):
                await agent.warm()


# -- worker: one side, one fresh process --------------------------------------------------------


# floor:rlms-venv is the same floor with the openai client of the rlms venv (a newer major
# version than the one litellm pins in ours); the faster of the two floors is the floor.
RLMS_VENV_SIDES = ("rlms", "floor:rlms-venv")
COUNCIL_SIDES = ("council", "council:cold", "council:litellm", "council:sdk", "council:function")
FLOORS = ("floor", "floor:rlms-venv")


def side_once(side: str, stub: str, run: str, n: int, context: str) -> dict:
    if side in FLOORS:
        return floor_once(stub, run, n, context)
    if side == "raw-aiohttp":
        return raw_once(stub, run, n, context)
    if side.startswith("litellm:"):
        return litellm_once(stub, run, n, context, side.split(":", 1)[1])
    if side == "rlms":
        return rlms_once(stub, run, n, context)
    if side.startswith("council:depth"):
        return depth_once(stub, run, int(side.removeprefix("council:depth")), context)
    if side in COUNCIL_SIDES:
        return council_once(
            stub,
            run,
            n,
            context,
            sdk=side == "council:sdk",
            function_sub=side == "council:function",
            cold=side == "council:cold",
            lean=side not in ("council:litellm", "council:sdk"),
        )
    raise SystemExit(f"unknown side {side!r}")


def versions(side: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("openai", "litellm", "aiohttp", "httpx", "pydantic", "rlms", "nats-py"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def worker(side: str, stub: str, ns: list[int], chars: int, warmup: bool) -> None:
    """Runs in a child process; the last stdout line is this side's JSON result."""
    context = make_context(chars)
    tag = f"{side.replace(':', '-')}-{os.getpid()}"
    if warmup:  # imports, first connections, lazy caches: not what is being compared
        side_once(side, stub, f"{tag}-warm", min(ns), context)
    out: dict = {"versions": versions(side)}
    for i, n in enumerate(ns):
        out[str(n)] = side_once(side, stub, f"{tag}-{i}-{n}", n, context)
    print(json.dumps(out), flush=True)


# -- parent: venvs, the stub, rounds, memory, the report ----------------------------------------


def ensure_rlms_venv() -> None:
    if RLMS_PYTHON.exists():
        probe = subprocess.run(
            [str(RLMS_PYTHON), "-c", "import rlm, openai"], capture_output=True, text=True
        )
        if probe.returncode == 0:
            return
    print(f"creating {RLMS_VENV} with rlms (the paper's package) and openai ...", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(RLMS_VENV)], check=True)
    # Pinned to the versions BENCHMARKS.md was measured with: a new release of either is a
    # new baseline, taken deliberately (raise the pins with a fresh run).
    subprocess.run([str(RLMS_PYTHON), "-m", "pip", "install", "-q", *RLMS_PINS], check=True)


class Stub:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(OUR_PYTHON), str(HERE / "openai_stub.py")],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"the scripted server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _label(pid: int) -> str:
    """A short name for a process: nats-server, the REPL worker, or the framework itself."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv)
    if "nats-server" in text:
        return "nats-server"
    if "-m agents.repl" in text:
        return "repl-worker"
    if "--worker" in text:
        return "framework"
    return Path(argv[0].decode(errors="replace")).name or "?"


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_worker(
    side: str, stub: str, ns: list[int], chars: int, *, warmup: bool, sample: bool = False
) -> tuple[dict, int, dict[str, int]]:
    """One side in a fresh process: its result, the peak summed RSS of its process tree,
    and each kind of process's own peak (framework, repl-worker, nats-server)."""
    python = RLMS_PYTHON if side in RLMS_VENV_SIDES else OUR_PYTHON
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--stub", stub]
    cmd += ["--ns", ",".join(map(str, ns)), "--chars", str(chars)]
    if warmup:
        cmd.append("--warmup")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    per: dict[str, int] = {}
    labels: dict[int, str] = {}
    done = threading.Event()

    def sampler() -> None:
        nonlocal peak
        while not done.wait(0.02):
            sizes = {p: _rss(p) for p in _tree(proc.pid)}
            peak = max(peak, sum(sizes.values()))
            for p, size in sizes.items():
                if not size:  # gone between listing and reading
                    continue
                label = labels.get(p) or labels.setdefault(p, _label(p))
                per[label] = max(per.get(label, 0), size)

    t = threading.Thread(target=sampler, daemon=True)
    if sample:
        t.start()
    stdout, stderr = proc.communicate()
    done.set()
    if proc.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"{side} worker failed ({proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), peak, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ns", default="100,500,1000", help="fan-out sizes (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side, interleaved")
    ap.add_argument(
        "--chars", type=int, default=1_000_000, help="context size for the timed runs (characters)"
    )
    ap.add_argument(
        "--memory-tokens", type=int, default=10_000_000, help="context for the memory run; 0 skips"
    )
    ap.add_argument("--memory-n", type=int, default=500)
    ap.add_argument(
        "--depths", default="1,2,3", help="agent-tree depths for the 512-leaf rows; empty skips"
    )
    ap.add_argument(
        "--sides",
        default="raw-aiohttp,floor,floor:rlms-venv,litellm:ours_full,litellm:ours,"
        "rlms,council,council:cold,council:litellm,council:function",
    )
    ap.add_argument(
        "--quick", action="store_true", help="N=20,50, 100k chars, 1 round, 1M-token memory run"
    )
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--stub", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    ns = [int(x) for x in a.ns.split(",")]

    if a.worker:
        worker(a.worker, a.stub, ns, a.chars, a.warmup)
        return
    if a.quick:
        ns, a.rounds, a.chars = [20, 50], 1, 100_000
        a.memory_tokens = min(a.memory_tokens, 1_000_000)
    sides = a.sides.split(",")
    if any(s in RLMS_VENV_SIDES for s in sides):
        ensure_rlms_venv()

    load_before = os.getloadavg()
    stub = Stub()
    walls: dict[str, dict[int, list[float]]] = {s: {n: [] for n in ns} for s in sides}
    extra: dict[str, dict] = {}
    cpus: dict[str, dict[int, list[float]]] = {}
    lib_versions: dict[str, dict] = {}
    errors: dict[str, str] = {}
    depth_walls: dict[int, list[float]] = {}
    try:
        for r in range(a.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                if side in errors:
                    continue
                try:
                    res, _, _ = run_worker(side, stub.url, ns, a.chars, warmup=True)
                except RuntimeError as e:
                    errors[side] = str(e).strip().splitlines()[-1][:300]
                    print(f"  {side}: FAILED: {errors[side]}", flush=True)
                    continue
                lib_versions[side] = res.pop("versions", {})
                for n in ns:
                    walls[side][n].append(res[str(n)]["wall"])
                    if "cpu" in res[str(n)]:
                        cpus.setdefault(side, {}).setdefault(n, []).append(res[str(n)]["cpu"])
                    extra.setdefault(side, {})[n] = res[str(n)]
                print(
                    f"round {r + 1}/{a.rounds} {side:20s} "
                    + "  ".join(f"N={n}: {res[str(n)]['wall']:.3f}s" for n in ns),
                    flush=True,
                )
        depths = [int(d) for d in a.depths.split(",") if d.strip()]
        for r in range(a.rounds if depths else 0):
            for d in depths[r % len(depths) :] + depths[: r % len(depths)]:
                side = f"council:depth{d}"
                if side in errors:
                    continue
                try:
                    res, _, _ = run_worker(side, stub.url, [512], a.chars, warmup=True)
                except RuntimeError as e:
                    errors[side] = str(e).strip().splitlines()[-1][:300]
                    print(f"  {side}: FAILED: {errors[side]}", flush=True)
                    continue
                depth_walls.setdefault(d, []).append(res["512"]["wall"])
                print(f"round {r + 1}/{a.rounds} {side:20s} 512 leaves: {res['512']['wall']:.3f}s")
        memory = {}
        if a.memory_tokens:
            chars = a.memory_tokens * TOKEN_CHARS
            for side in ("rlms", "council"):
                if side not in sides or side in errors:
                    continue
                try:
                    res, peak, per = run_worker(
                        side, stub.url, [a.memory_n], chars, warmup=False, sample=True
                    )
                except RuntimeError as e:
                    errors[f"{side}_memory"] = str(e).strip().splitlines()[-1][:300]
                    print(f"  {side} memory run FAILED: {errors[side + '_memory']}", flush=True)
                    continue
                memory[side] = {
                    "peak_rss_mb": peak / 2**20,
                    "wall": res[str(a.memory_n)]["wall"],
                    **{f"peak_{k}_mb": v / 2**20 for k, v in per.items()},
                }
                print(
                    f"memory {side:8s} {a.memory_tokens:,} tokens, N={a.memory_n}: "
                    f"peak RSS {peak / 2**20:.0f} MB, wall {memory[side]['wall']:.2f}s",
                    flush=True,
                )
    finally:
        stub.close()

    load = {"before": load_before, "after": os.getloadavg()}
    print(report(ns, sides, walls, cpus, extra, memory, errors, lib_versions, load, a, depth_walls))


def report(
    ns, sides, walls, cpus, extra, memory, errors, versions_seen, load, a, depth_walls
) -> str:
    med = {s: {n: statistics.median(walls[s][n]) for n in ns if walls[s][n]} for s in sides}
    # The floor at each N: the faster of the floors measured (the stricter baseline).
    floor = {}
    for n in ns:
        have = [(med[f][n], f) for f in FLOORS if n in med.get(f, {})]
        if have:
            floor[n] = min(have)

    def to_floor(s: str, n: int) -> float | None:
        return med[s][n] / floor[n][0] if n in med.get(s, {}) and n in floor else None

    def to_rlms(s: str, n: int) -> float | None:
        if n in med.get(s, {}) and n in med.get("rlms", {}):
            return med[s][n] / med["rlms"][n]
        return None

    def to_raw(s: str, n: int) -> float | None:
        if n in med.get(s, {}) and n in med.get("raw-aiohttp", {}):
            return med[s][n] / med["raw-aiohttp"][n]
        return None

    def slope_ms(s: str) -> float | None:
        """ms per sub-call from the smallest to the largest N (the fixed cost drops out)."""
        have = sorted(med.get(s, {}).items())
        if len(have) < 2:
            return None
        (n0, w0), (n1, w1) = have[0], have[-1]
        return (w1 - w0) / (n1 - n0) * 1000

    mid = 500 if 500 in ns else ns[len(ns) // 2]
    head = f"{'side':22s}" + "".join(f"{'N=' + str(n):>10s}" for n in ns)
    if len(ns) > 1:
        head += f"{'ms/call':>10s}"
    lines = [
        "",
        f"wall time (s), median of {a.rounds} fresh-process rounds; context {a.chars:,} chars; "
        f"{CONCURRENCY} in flight; ratios at N={mid}",
        head + "   x floor    x rlms   x raw-aiohttp",
    ]
    for s in sides:
        if not med.get(s):
            lines.append(f"{s:22s}  (no figures: {errors.get(s, 'not run')})")
            continue
        rf, rr, rw, sl = to_floor(s, mid), to_rlms(s, mid), to_raw(s, mid), slope_ms(s)
        lines.append(
            f"{s:22s}"
            + "".join(f"{med[s][n]:10.3f}" if n in med[s] else f"{'-':>10s}" for n in ns)
            + (f"{sl:10.3f}" if sl is not None else ("" if len(ns) < 2 else f"{'-':>10s}"))
            + (f"   {rf:6.2f}x" if rf else "         -")
            + (f"   {rr:6.2f}x" if rr else "         -")
            + (f"   {rw:6.2f}x raw" if rw else "")
        )
    if floor:
        lines.append("floor = " + ", ".join(f"N={n}: {f}" for n, (_, f) in floor.items()))
    cpu_ms = {
        s: {n: statistics.median(v) / n * 1000 for n, v in per.items()} for s, per in cpus.items()
    }
    if cpu_ms:
        lines.append("CPU per call of the calling process (ms, median):")
        for s, per in cpu_ms.items():
            lines.append(f"  {s:20s}" + "".join(f"{per[n]:10.3f}" for n in ns if n in per))
    for s, m in memory.items():
        parts = ", ".join(
            f"{k[5:-3]} {v:.0f}"
            for k, v in m.items()
            if k.startswith("peak_") and k != "peak_rss_mb"
        )
        lines.append(
            f"{s}: {a.memory_tokens:,}-token context, N={a.memory_n}: peak RSS of its process "
            f"tree {m['peak_rss_mb']:.0f} MB ({parts}), wall {m['wall']:.2f}s"
        )
    for s in sides:
        if not s.startswith(("rlms", "council")) or s == "council:function":
            continue
        for n, e in sorted(extra.get(s, {}).items()):
            if "tokens_reported" in e:
                lines.append(
                    f"{s} N={n}: tokens reported {e['tokens_reported']:,}, "
                    f"served by the model {e['tokens_served']:,}"
                )
    depth_med = {d: statistics.median(w) for d, w in sorted(depth_walls.items())}
    for d, w in depth_med.items():
        over = f", {w / depth_med[1]:.2f}x depth 1" if 1 in depth_med else ""
        lines.append(f"council depth {d}: 512 leaf calls in {w:.3f}s (median){over}")
    for s, e in errors.items():
        lines.append(f"FAILED {s}: {e}")
    lines.append(
        f"load average (1 min) before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f} "
        f"on {os.cpu_count()} cores"
    )

    fig: dict = {
        "machine": f"{os.cpu_count()} cores, shared with other work",
        "load_avg_1m": {k: round(v[0], 2) for k, v in load.items()},
        "context_chars": a.chars,
        "concurrency": CONCURRENCY,
        "rounds": a.rounds,
        "versions": versions_seen,
        "wall_s": {
            s: {str(n): round(v, 4) for n, v in med[s].items()} for s in sides if med.get(s)
        },
        "floor": {str(n): f for n, (_, f) in floor.items()},
        "ratio_to_floor": {
            s: {str(n): round(r, 3) for n in ns if (r := to_floor(s, n))}
            for s in sides
            if med.get(s)
        },
        "ratio_to_raw_aiohttp": {
            s: {str(n): round(r, 3) for n in ns if (r := to_raw(s, n))} for s in sides if med.get(s)
        },
        "ms_per_call_slope": {
            s: round(v, 4) for s in sides if med.get(s) and (v := slope_ms(s)) is not None
        },
        "ratio_to_rlms": {
            s: {str(n): round(r, 3) for n in ns if (r := to_rlms(s, n))}
            for s in sides
            if med.get(s)
        },
        "cpu_ms_per_call": {
            s: {str(n): round(v, 3) for n, v in per.items()} for s, per in cpu_ms.items()
        },
        "memory": {
            s: {
                "tokens": a.memory_tokens,
                "n": a.memory_n,
                **{k: round(v, 2) for k, v in m.items()},
            }
            for s, m in memory.items()
        },
        "tokens": {
            s: {
                str(n): {k: e[k] for k in ("tokens_reported", "tokens_served")}
                for n, e in v.items()
            }
            for s, v in extra.items()
            if s.startswith(("rlms", "council")) and s != "council:function"
        },
        "errors": errors,
    }
    targets = {}
    for s in ("council", "council:cold", "council:litellm", "council:sdk"):
        r, f, w = to_rlms(s, 500), to_floor(s, 500), to_raw(s, 500)
        if r is not None and f is not None:
            targets[s] = {
                "over_rlms": round(r, 3),
                "over_floor": round(f, 3),
                "over_raw_aiohttp": round(w, 3) if w is not None else None,
                "met": bool(r <= 0.35 and f <= 0.5),
            }
    fig["depth_512_leaves_s"] = {str(d): round(w, 4) for d, w in depth_med.items()}
    if 1 in depth_med and 3 in depth_med:
        ratio = depth_med[3] / depth_med[1]
        fig["target_depth3"] = {
            "want": "<= 1.5x depth 1",
            "over_depth1": round(ratio, 3),
            "met": bool(ratio <= 1.5),
        }
    fig["targets_n500"] = {
        "want": "<= 0.35x rlms and <= 0.5x the openai-SDK floor (aim: < 4x raw-aiohttp)",
        **targets,
    }
    return "\n".join(lines) + "\n" + json.dumps(fig)


if __name__ == "__main__":
    main()
