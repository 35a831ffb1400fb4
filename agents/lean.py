"""The lean path: litellm as a translation library, aiohttp as the transport.

`litellm.acompletion` spends about 2.4 ms of CPU per call on things a served model does
not need on every call (a synchronous set-up run in a worker thread, a logging object,
httpx objects wrapped around aiohttp, the full pricing machinery). Those costs bound an
LLM peer fanning out hundreds of sub-calls. This module resolves, once per model, what
litellm would resolve per call (the provider, its chat config, the base URL and key, the
price), and then per call runs only the provider config's own request transform, one
POST on a long-lived aiohttp session, and the config's own response transform and error
mapping. So the text, tokens, cost and exception classes are litellm's, as on the full
path; `tests/test_lean.py` checks that against a scripted server per provider.

What needs the rest of litellm falls back to `litellm.acompletion` (see `LeanRoute.why_not`
and `resolve`): callbacks, budgets, caching, unknown parameters, streaming, providers whose
requests are signed or transformed asynchronously, and event loops other than asyncio.
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any

from agents.models import CALLBACK_LISTS, Messages, ModelResponse, read_response
from channels import log

_log = log.get("council.lean")

# Providers whose chat goes, in litellm, through one plain POST that the provider's chat
# config fully describes (headers, URL, body, response, errors).
OPENAI_COMPATIBLE = frozenset({"openai", "hosted_vllm", "lm_studio", "openai_like"})
PROVIDERS = OPENAI_COMPATIBLE | {"anthropic"}

# Options of a LiteLLMModel the lean path knows what to do with; any other option makes the
# model take litellm's full path (it may mean something only litellm knows).
CONNECTION_OPTIONS = frozenset(
    {"api_base", "base_url", "api_key", "timeout", "extra_headers", "max_retries", "num_retries"}
)
# Per-call model parameters the lean path maps with the config's own `map_openai_params`.
MODEL_PARAMS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
    }
)

# litellm's own per-provider environment for the base URL, in its order of precedence.
_ENV_BASE = {
    "openai": ("OPENAI_BASE_URL", "OPENAI_API_BASE"),
    "anthropic": ("ANTHROPIC_API_BASE", "ANTHROPIC_BASE_URL"),
}
_DEFAULT_BASE = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1/messages",
}


class _Quiet:
    """Stands in for litellm's per-call logging object, which nobody reads on this path."""

    def __init__(self) -> None:
        self.model_call_details: dict[str, Any] = {}
        self.optional_params: dict[str, Any] = {}

    def pre_call(self, *args: Any, **kwargs: Any) -> None:
        pass

    def post_call(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class Request:
    """One HTTP request as the provider config built it (what goes on the wire)."""

    url: str
    headers: dict[str, str]
    data: dict[str, Any]
    optional_params: dict[str, Any]
    json_mode: bool

    def body(self) -> bytes:
        return json.dumps(self.data).encode()


@dataclass
class LeanRoute:
    """One model's resolved route: everything litellm would otherwise work out per call."""

    lib: ModuleType
    model: str  # the model string the user gave, e.g. "openai/gpt-4o-mini"
    name: str  # without the provider prefix, as the provider knows it
    provider: str
    config: Any  # litellm's BaseConfig for this provider and model
    api_base: str
    api_key: str | None
    extra_headers: dict[str, str]
    timeout: float
    supported: frozenset[str]
    prices: tuple[float, float] | None  # per input / output token, when the price is linear
    priced: bool  # litellm knows a price for this model (linear or not)
    proxy: str | None  # from the environment once (aiohttp would ask per request, in a thread)
    proxy_auth: Any
    default_params: dict[str, Any]  # model parameters given with the model, sent with every call
    _sessions: weakref.WeakKeyDictionary[Any, Any] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    # -- per call -------------------------------------------------------------------------

    def why_not(self, params: dict[str, Any]) -> str | None:
        """Why this call needs litellm's full path, or None when the lean path serves it.

        Checked per call because callbacks, budgets and caches can be switched on at any time.
        """
        lib = self.lib
        if lib.cache is not None:
            return "litellm.cache is set"
        if getattr(lib, "max_budget", 0):
            return "litellm.max_budget is set"
        for attr in CALLBACK_LISTS:
            if getattr(lib, attr, None):
                return f"litellm.{attr} is set"
        unknown = params.keys() - self.supported
        if unknown:
            return f"parameters litellm must map: {sorted(unknown)}"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return "not on an asyncio event loop"
        if loop.__class__.__module__.startswith("trio"):
            return "not on an asyncio event loop"
        return None

    def request(self, messages: Messages, params: dict[str, Any]) -> Request:
        """The request litellm would send: the provider config's own mapping and transforms.

        This is the one place a request is built on the lean path (a `response_format`
        given as a parameter goes through the config's `map_openai_params` like any other).
        """
        config = self.config
        optional = config.map_openai_params(
            non_default_params=dict(params),
            optional_params={},
            model=self.name,
            drop_params=bool(self.lib.drop_params),
        )
        json_mode = bool(optional.pop("json_mode", False))
        if self.provider == "anthropic":
            optional["is_vertex_request"] = False  # as litellm's Anthropic handler sets it
        litellm_params = self._litellm_params()
        headers = config.validate_environment(
            headers=dict(self.extra_headers),
            model=self.name,
            messages=messages,
            optional_params=optional,
            litellm_params=litellm_params,
            api_key=self.api_key,
            api_base=self.api_base,
        )
        url = config.get_complete_url(
            api_base=self.api_base,
            api_key=self.api_key,
            model=self.name,
            optional_params=optional,
            litellm_params=litellm_params,
            stream=False,
        )
        data = config.transform_request(
            model=self.name,
            messages=messages,
            optional_params=optional,
            litellm_params=litellm_params,
            headers=headers,
        )
        if self.provider == "anthropic":  # what litellm's Anthropic handler does after transforming
            from litellm.anthropic_beta_gated_fields import strip_beta_gated_request_body
            from litellm.anthropic_beta_headers_manager import update_request_with_filtered_beta

            headers, data = update_request_with_filtered_beta(
                headers=headers, request_data=data, provider=self.provider, api_base=url
            )
            data = dict(
                strip_beta_gated_request_body(
                    data,
                    headers,
                    drop_params=self.lib.drop_params,
                    model=self.name,
                    provider=self.provider,
                )
            )
        return Request(url, headers, data, optional, json_mode)

    async def complete(self, messages: Messages, params: dict[str, Any]) -> ModelResponse:
        request = self.request(messages, params)
        session = self._session()
        try:
            async with session.post(
                request.url,
                data=request.body(),
                headers=request.headers,
                proxy=self.proxy,
                proxy_auth=self.proxy_auth,
            ) as http:
                status = http.status
                headers = {k.lower(): v for k, v in http.headers.items()}
                body = await http.read()
        except TimeoutError as e:
            raise self.lib.Timeout(
                message=f"{self.provider} did not answer within {self.timeout:g}s: {e}",
                model=self.name,
                llm_provider=self.provider,
            ) from None
        except (OSError, _aiohttp().ClientError) as e:
            raise self._mapped(str(e) or type(e).__name__, 500, {}) from None
        if status >= 400:
            raise self._mapped(body.decode("utf-8", errors="replace"), status, headers)
        return self._response(request, messages, status, headers, body)

    def _response(
        self,
        request: Request,
        messages: Messages,
        status: int,
        headers: dict[str, str],
        body: bytes,
    ) -> ModelResponse:
        import httpx

        lib = self.lib
        raw = httpx.Response(status, headers=headers, content=body)
        out = self.config.transform_response(
            model=self.name,
            raw_response=raw,
            model_response=lib.ModelResponse(),
            logging_obj=_Quiet(),
            request_data=request.data,
            messages=messages,
            optional_params=request.optional_params,
            litellm_params=self._litellm_params(),
            encoding=None,
            api_key=self.api_key,
            json_mode=request.json_mode,
        )
        return read_response(out, self.model, partial(self._cost, out))

    def _cost(self, out: Any, usage: Any, input_tokens: int, output_tokens: int) -> float | None:
        """litellm's price for this response: read from its table once when it is linear."""
        if not self.priced:
            return None
        if self.prices is not None and not _cached_tokens(usage):
            return input_tokens * self.prices[0] + output_tokens * self.prices[1]
        try:  # tiers, cache reads or writes: litellm's full pricing, as on its own path
            return float(
                self.lib.completion_cost(
                    completion_response=out, model=self.name, custom_llm_provider=self.provider
                )
            )
        except Exception:
            return None

    def _mapped(self, text: str, status: int, headers: dict[str, str]) -> Exception:
        """The provider's failure as litellm's own exception class, mapped as litellm maps it."""
        from litellm.litellm_core_utils.exception_mapping_utils import exception_type

        error = self.config.get_error_class(error_message=text, status_code=status, headers=headers)
        # litellm has no chat route of its own for openai_like/, so no mapping to match: it
        # is OpenAI-compatible by definition and gets the OpenAI-compatible mapping.
        mapping = "openai" if self.provider == "openai_like" else self.provider
        try:
            mapped = exception_type(
                model=self.name, original_exception=error, custom_llm_provider=mapping
            )
        except Exception as e:
            return e
        return mapped if isinstance(mapped, Exception) else error

    def _litellm_params(self) -> dict[str, Any]:
        return {
            "api_base": self.api_base,
            "api_key": self.api_key,
            "custom_llm_provider": self.provider,
            "drop_params": self.lib.drop_params,
        }

    # -- the session ------------------------------------------------------------------------

    def _session(self) -> Any:
        """One long-lived session per event loop (aiohttp sessions are bound to their loop)."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            aiohttp = _aiohttp()
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=_ssl(self.lib)),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                trust_env=False,  # the proxy is resolved once, see `_proxy`
                skip_auto_headers=("User-Agent",),
            )
            self._sessions[loop] = session
            _log.debug("lean.session_opened", model=self.model)
        return session

    async def aclose(self) -> None:
        """Close this event loop's session (the others belong to loops that may be gone)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        session = self._sessions.pop(loop, None)
        if session is not None and not session.closed:
            await session.close()
            _log.debug("lean.session_closed", model=self.model)


# -- resolving a route, once per model --------------------------------------------------------


def resolve(lib: ModuleType, model: str, options: dict[str, Any]) -> LeanRoute | str:
    """The lean route for `model` with these LiteLLMModel options, or why there is none."""
    unknown = sorted(k for k in options if k not in CONNECTION_OPTIONS and k not in MODEL_PARAMS)
    if unknown:
        return f"options only litellm knows: {unknown}"
    api_base = options.get("api_base") or options.get("base_url")
    try:
        name, provider, dynamic_key, dynamic_base = lib.get_llm_provider(
            model=model, api_base=api_base, api_key=options.get("api_key")
        )
    except Exception as e:
        return f"litellm cannot resolve the provider: {e}"
    if provider not in PROVIDERS:
        return f"provider {provider!r} is not on the lean path"
    if provider == "openai" and not _env_true("EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER"):
        return (
            "openai/ is routed through the OpenAI SDK (EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER)"
        )
    from litellm.llms.base_llm.chat.transformation import BaseConfig
    from litellm.utils import ProviderConfigManager

    config = ProviderConfigManager.get_provider_chat_config(
        model=name, provider=lib.LlmProviders(provider)
    )
    if config is None:
        return f"litellm has no chat config for {provider}/{name}"
    if type(config).sign_request is not BaseConfig.sign_request:
        return "the provider signs its requests"
    if getattr(config, "uses_async_transform_request", False):
        return "the provider transforms requests asynchronously"
    info = _model_info(lib, name, provider)
    if info.get("mode") not in (None, "chat"):
        return f"litellm serves this model in {info.get('mode')!r} mode"
    base = _api_base(lib, provider, api_base or dynamic_base)
    if base is None:
        return f"no api_base for {provider} (pass api_base= or set the provider's environment)"
    if provider == "anthropic" and not _env_true("LITELLM_ANTHROPIC_DISABLE_URL_SUFFIX"):
        from litellm.litellm_core_utils.url_utils import ensure_api_route

        base = ensure_api_route(base, "v1/messages")
    key = _api_key(lib, provider, options.get("api_key") or dynamic_key)
    headers = options.get("extra_headers") or {}
    if not isinstance(headers, dict):
        return "extra_headers is not a dict"
    params = MODEL_PARAMS & set(config.get_supported_openai_params(model=name))
    timeout = options.get("timeout") or lib.request_timeout
    if not isinstance(timeout, (int, float)):
        return "a timeout litellm must interpret"
    prices, priced = _prices(info)
    return LeanRoute(
        lib=lib,
        model=model,
        name=name,
        provider=provider,
        config=config,
        api_base=base,
        api_key=key,
        extra_headers={str(k): str(v) for k, v in headers.items()},
        timeout=float(timeout),
        supported=frozenset(params),
        prices=prices,
        priced=priced,
        default_params={k: v for k, v in options.items() if k in MODEL_PARAMS},
        **_proxy(lib, base),
    )


def _proxy(lib: ModuleType, base: str) -> dict[str, Any]:
    """The proxy litellm's aiohttp transport would take from the environment for this base.

    litellm trusts the environment (HTTP(S)_PROXY, NO_PROXY) unless told not to; aiohttp
    would look it up in a worker thread on every request, so it is looked up here once.
    """
    none = {"proxy": None, "proxy_auth": None}
    if getattr(lib, "disable_aiohttp_trust_env", False) or _env_true("DISABLE_AIOHTTP_TRUST_ENV"):
        return none
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        proxy, auth = get_env_proxy_for_url(URL(base))
    except LookupError:  # no proxy for this host (none set, or NO_PROXY names it)
        return none
    return {"proxy": str(proxy), "proxy_auth": auth}


def _api_base(lib: ModuleType, provider: str, given: str | None) -> str | None:
    """As litellm resolves it per provider: given > litellm.api_base > environment > default."""
    if given:
        return given
    if lib.api_base:
        return lib.api_base
    for var in _ENV_BASE.get(provider, ()):
        if os.environ.get(var):
            return os.environ[var]
    return _DEFAULT_BASE.get(provider)


def _api_key(lib: ModuleType, provider: str, given: str | None) -> str | None:
    if given:
        return given
    if provider == "anthropic":
        return lib.anthropic_key or lib.api_key or os.environ.get("ANTHROPIC_API_KEY")
    return lib.api_key or lib.openai_key or os.environ.get("OPENAI_API_KEY")


def _model_info(lib: ModuleType, name: str, provider: str) -> dict[str, Any]:
    try:
        return dict(lib.get_model_info(model=name, custom_llm_provider=provider))
    except Exception:
        return {}


def _prices(info: dict[str, Any]) -> tuple[tuple[float, float] | None, bool]:
    """(linear per-token prices or None, whether litellm knows any price)."""
    inp, out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if inp is None or out is None:
        return None, False
    tiered = any("above" in k or "tier" in k for k, v in info.items() if v and "cost" in k)
    return (None if tiered else (float(inp), float(out))), True


def _cached_tokens(usage: Any) -> bool:
    if usage is None:
        return False
    details = getattr(usage, "prompt_tokens_details", None)
    return bool(
        getattr(details, "cached_tokens", 0)
        or getattr(usage, "cache_read_input_tokens", 0)
        or getattr(usage, "cache_creation_input_tokens", 0)
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _ssl(lib: ModuleType) -> Any:
    return None if getattr(lib, "ssl_verify", True) is not False else False


def _aiohttp() -> ModuleType:
    import aiohttp

    return aiohttp
