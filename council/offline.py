"""Models for the command line: model objects from a file, SmolLM2 for `local`, and a check
of which model strings can run here at all.

A declaration names models by string. `council run` resolves each string in this order:
an object from `--models FILE:name` (a dict keyed by model string or peer name, or a
function returning one: how scripted models reach the CLI); SmolLM2 served on loopback for
the string `local` or any `local/...` (the `local` extra, no network); else litellm.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from channels.errors import CouncilError
from council.declare import LLM, Agent, Council, resolve


def is_local(model: str) -> bool:
    """`local` and `local/<anything>` name SmolLM2 served offline by the `local` extra."""
    return model == "local" or model.startswith("local/")


def load_models(target: str) -> dict[str, Any]:
    """The `--models FILE:name` mapping: a dict, or a function of no arguments returning one."""
    if ":" not in target:
        raise CouncilError(f"--models {target}: give FILE.py:name or module:name")
    obj = resolve(target)
    if callable(obj) and not isinstance(obj, Mapping):
        obj = obj()
    if not isinstance(obj, Mapping):
        raise CouncilError(
            f"--models {target} is a {type(obj).__name__}; point at a dict of model string "
            "(or peer name) -> model object, or a function returning one"
        )
    return dict(obj)


def model_strings(council: Council) -> dict[str, str]:
    """peer name -> the model string it runs on (agents and LLM peers)."""
    out: dict[str, str] = {}
    for p in council.peers:
        if isinstance(p, Agent | LLM):
            model = p.model or council.model
            if model:
                out[p.name] = model
    return out


@asynccontextmanager
async def models_for(
    council: Council, given: Mapping[str, Any], *, start: bool = True, only: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """`given`, plus SmolLM2 for every `local` model string it does not cover (started
    here, stopped on exit; not with `start=False`, as for a replay; `only`: for this peer
    alone, as `council serve` runs one)."""
    models = dict(given)
    wanted = {
        m
        for peer, m in model_strings(council).items()
        if is_local(m) and not _covered(models, peer, m) and only in (None, peer)
    }
    if not wanted or not start:
        yield models
        return
    from agents.local import LocalModelServer

    server = LocalModelServer(n_ctx=4096)
    try:
        await server.astart(timeout=180)
        for m in wanted:
            models[m] = server.model()
        yield models
    finally:
        server.cleanup()


def _covered(models: Mapping[str, Any], peer: str, model: str) -> bool:
    return peer in models or model in models or f"{peer}-model" in models


def problems(council: Council, given: Mapping[str, Any] | None = None) -> dict[str, str]:
    """model string -> why it cannot run here (unknown to litellm, no API key, `local`
    extra missing); empty when every model can. Never raises."""
    given = given or {}
    out: dict[str, str] = {}
    for peer, model in model_strings(council).items():
        if model in out or _covered(given, peer, model):
            continue
        why = _problem(model)
        if why:
            out[model] = why
    return out


def _problem(model: str) -> str | None:
    if is_local(model):
        from agents.local import LocalModelMissing, require_llama_server, smollm2_path

        try:
            smollm2_path()
            require_llama_server()
        except LocalModelMissing as e:
            return str(e)
        return None
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm

        litellm.suppress_debug_info = True  # else it prints a provider list to stdout
        _, provider, _, _ = litellm.get_llm_provider(model)
    except Exception:
        return (
            "not a model litellm knows (give provider/model, e.g. openai/gpt-4o-mini; "
            "`local` for SmolLM2 offline; or map it to a model object with --models FILE:name)"
        )
    try:
        env = litellm.validate_environment(model)
    except Exception:
        return None
    missing = [k for k in env.get("missing_keys") or () if k]
    if missing:
        return f"{', '.join(missing)} not set (the {provider} API key)"
    return None
