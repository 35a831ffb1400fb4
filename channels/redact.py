"""Credentials out of everything written down: cassettes, traces, logs.

Two rules, applied to any JSON-like value (strings anywhere in it, dict keys included):

- a value under a key that names a credential (`api_key`, `x-api-key`, `Authorization`,
  `password`, `auth_token`, ...) is replaced by `MASK`, whatever it looks like;
- a string that looks like a credential (provider key formats such as `sk-...`,
  `sk-ant-...`, `AKIA...`, `ghp_...`, `xoxb-...`; bearer tokens; JWTs; the user:password
  of a URL; `?key=` style query parameters) has that part replaced by `MASK`.

The masking is deterministic and idempotent, so a recorder and a replayer that both mask
see the same request: a replay still matches a recording that was masked. Patterns are
process-wide (`add_pattern`), because every writer in a process must hide the same things:
a council file can add its own when it is loaded (`channels.redact.add_pattern(...)`),
the way vcrpy's `filter_headers` / `before_record` extend what a cassette keeps out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

MASK = "[MASKED]"

# A credential-shaped token must not be the tail of a longer word ("task-..." is not "sk-").
_START = r"(?<![A-Za-z0-9])"
_BUILTIN: list[tuple[re.Pattern[str], str]] = [
    (re.compile(_START + r"sk-[A-Za-z0-9_-]{16,}"), MASK),  # OpenAI, Anthropic (sk-ant-...)
    (re.compile(_START + r"(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Z])"), MASK),  # AWS key ids
    (re.compile(_START + r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), MASK),
    (re.compile(_START + r"xox[abposr]-[A-Za-z0-9-]{8,}"), MASK),  # Slack
    (re.compile(_START + r"AIza[0-9A-Za-z_-]{30,}"), MASK),  # Google API keys
    (re.compile(_START + r"hf_[A-Za-z0-9]{20,}"), MASK),  # Hugging Face
    (re.compile(_START + r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), MASK),
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\g<1>" + MASK),
    (re.compile(r"(?i)(\bbasic\s+)[A-Za-z0-9+/]{12,}={0,2}"), r"\g<1>" + MASK),
    # scheme://user:password@host -> scheme://[MASKED]@host
    (
        re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/@:\"'<>]+:[^\s/@\"'<>]+@"),
        r"\g<1>" + MASK + "@",
    ),
    # ?api_key=...&token=...
    (
        re.compile(
            r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|auth|sig|signature|password|"
            r"secret)=)[^&#\s\"'<>]+"
        ),
        r"\g<1>" + MASK,
    ),
]

# Keys whose value is a credential, whatever the value looks like.
_SECRET_KEY = re.compile(
    r"(?i)(?:.*[_-])?(?:api[_-]?key|apikey|secret|secret[_-]?key|token|auth[_-]?token|"
    r"access[_-]?token|refresh[_-]?token|password|passwd|authorization|credentials?|"
    r"cookie|set-cookie|access[_-]?key|private[_-]?key|client[_-]?secret)"
)

# A cheap test first (lower-cased substrings, far faster than one regex over the text): if
# none of these is in it, nothing in it can be masked. A key counts only when a string or an
# object follows it in raw JSON ("input_tokens": 5 is no credential).
_HINTS = (
    "sk-", "akia", "asia", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox",
    "aiza", "hf_", "eyj", "://", "bearer", "basic",
)  # fmt: skip
_KEY_HINTS = ("key", "secret", "token", "passw", "authorization", "credential", "cookie")
_QUERY = re.compile(r"[?&][A-Za-z_-]*=")
_KEY_VALUE = re.compile(
    rb'(?:key|secret|token|passw[a-z]*|authorization|credentials?|cookie)"\s*:\s*["{]'
)


def _maybe_text(lowered: str) -> bool:
    return any(h in lowered for h in _HINTS) or (
        "=" in lowered and _QUERY.search(lowered) is not None
    )


_extra: list[tuple[re.Pattern[str], str]] = []


def add_pattern(pattern: str | re.Pattern[str], replacement: str = MASK) -> None:
    """Mask what `pattern` matches too, in every cassette, trace and log line this process
    writes from now on (and in the requests a replay matches, so replays still match)."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    if all(p.pattern != compiled.pattern for p, _ in _extra):
        _extra.append((compiled, replacement))


def clear_patterns() -> None:
    """Forget the patterns added with `add_pattern` (the built-in ones stay)."""
    _extra.clear()


def secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.fullmatch(key))


def text(s: str) -> str:
    """`s` with every credential-shaped part replaced."""
    if not _extra and not _maybe_text(s.lower()):
        return s
    for pattern, replacement in _BUILTIN:
        s = pattern.sub(replacement, s)
    for pattern, replacement in _extra:
        s = pattern.sub(replacement, s)
    return s


def value(v: Any) -> Any:
    """A copy of a JSON-like value with credentials masked (the same object if none)."""
    if isinstance(v, str):
        return text(v)
    if isinstance(v, dict):
        out: dict[Any, Any] = {}
        changed = False
        for k, x in v.items():
            if isinstance(k, str) and secret_key(k) and isinstance(x, str | bytes) and x:
                y: Any = MASK
            elif isinstance(k, str) and secret_key(k) and isinstance(x, dict):
                y = {kk: MASK for kk in x}  # e.g. credentials={"user": ..., "password": ...}
            else:
                y = value(x)
            nk = text(k) if isinstance(k, str) else k
            changed = changed or y is not x or nk != k
            out[nk] = y
        return out if changed else v
    if isinstance(v, list | tuple):
        items = [value(x) for x in v]
        if all(a is b for a, b in zip(items, v, strict=True)):
            return v
        return type(v)(items) if isinstance(v, tuple) else items
    return v


def maybe_secret(data: bytes) -> bool:
    """False when raw JSON `data` certainly holds nothing to mask (the fast path)."""
    if _extra:
        return True
    lowered = data.lower()
    if _maybe_text(lowered.decode("utf-8", "replace")):
        return True
    return any(h.encode() in lowered for h in _KEY_HINTS) and _KEY_VALUE.search(lowered) is not None


def json_bytes(data: bytes) -> bytes:
    """Raw JSON with credentials masked; the same bytes when there is nothing to mask."""
    if not maybe_secret(data):
        return data
    try:
        obj = json.loads(data)
    except ValueError:
        return text(data.decode("utf-8", "replace")).encode()
    masked = value(obj)
    if masked is obj:
        return data
    return json.dumps(masked, separators=(",", ":"), ensure_ascii=False).encode()


def processor() -> Callable[[Any, str, dict[str, Any]], dict[str, Any]]:
    """A structlog processor that masks every field of every log event."""

    def mask(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        return value(event)

    return mask
