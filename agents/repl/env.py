"""The worker's environment: a short allow-list of the parent's, nothing else.

Model code can read its environment and print it into a transcript. A deny-list misses
names nobody thought of (`DB_PASS`, `SENTRY_DSN`, `SLACK_WEBHOOK`), so only variables that
locate things or set the locale pass; NATS credentials reach the worker on stdin.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import agents

ALLOWED = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "PYTHONHASHSEED",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "PYTHONWARNINGS",
        "VIRTUAL_ENV",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "COUNCIL_LOG_JSON",
        "COUNCIL_LOG_LEVEL",
    }
)
"""Names passed through as they are; `LC_*` passes too. Everything else is dropped."""


def worker_env(
    base: Mapping[str, str] | None = None, *, workdir: str, allow: Iterable[str] = ()
) -> dict[str, str]:
    """The variables of `base` (the parent's environment) named in ALLOWED or `allow`, plus
    what the worker needs: its packages on PYTHONPATH, HOME and TMPDIR in its own directory."""
    base = os.environ if base is None else base
    names = ALLOWED | set(allow)
    env = {k: v for k, v in base.items() if k in names or k.startswith("LC_")}
    root = str(Path(agents.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, base.get("PYTHONPATH", "")) if p)
    env["HOME"] = env["TMPDIR"] = workdir
    env["MALLOC_ARENA_MAX"] = "2"  # per-thread malloc arenas would eat the address-space limit
    env.setdefault("COUNCIL_LOG_JSON", "1")
    return env
