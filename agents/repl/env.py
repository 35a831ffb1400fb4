"""The worker's environment: the parent's, minus anything that looks like a secret.

Model code can read its environment and print it into a transcript; provider API keys
and passwords must not be there to find. NATS credentials reach the worker on stdin.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import agents

_SECRET_WORDS = re.compile(
    r"KEY|TOKEN|SECRET|PASSW(OR)?D|CREDENTIAL|CREDS|AUTH|COOKIE|PRIVATE|SIGNATURE", re.I
)
_PROVIDER_PREFIXES = (
    "OPENAI_",
    "ANTHROPIC_",
    "AZURE_",
    "AWS_",
    "GOOGLE_",
    "GEMINI_",
    "VERTEX",
    "COHERE_",
    "MISTRAL_",
    "GROQ_",
    "TOGETHER",
    "HUGGINGFACE",
    "HF_",
    "REPLICATE_",
    "DEEPSEEK_",
    "XAI_",
    "OPENROUTER_",
    "FIREWORKS_",
    "PERPLEXITY",
    "LITELLM_",
    "NATS_",
    "GH_",
    "GITHUB_",
)
_URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def worker_env(base: Mapping[str, str] | None = None, *, workdir: str) -> dict[str, str]:
    """The parent's environment minus anything that looks like a secret.

    Dropped: names containing KEY, TOKEN, SECRET, PASSWORD, CREDENTIAL, AUTH and the like,
    every variable of a model provider (OPENAI_*, ANTHROPIC_*, AWS_*, ...) or of NATS, and
    any value that is a URL with a password in it.
    """
    base = os.environ if base is None else base
    env = {
        k: v
        for k, v in base.items()
        if not _SECRET_WORDS.search(k)
        and not k.upper().startswith(_PROVIDER_PREFIXES)
        and not _URL_WITH_PASSWORD.search(v)
    }
    root = str(Path(agents.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["TMPDIR"] = workdir
    env["MALLOC_ARENA_MAX"] = "2"  # per-thread malloc arenas would eat the address-space limit
    env.setdefault("COUNCIL_LOG_JSON", "1")
    return env
