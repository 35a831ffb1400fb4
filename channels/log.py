"""structlog set-up shared by every layer: key-value events, JSON when not on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from channels import redact

_configured = False


class _Stderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was configured:
    a CLI or a test harness that swaps (and closes) stderr must never make a warning fatal."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Idempotent; COUNCIL_LOG_LEVEL and COUNCIL_LOG_JSON override the defaults."""
    global _configured
    level = (level or os.environ.get("COUNCIL_LOG_LEVEL") or "warning").upper()
    if json is None:
        env = os.environ.get("COUNCIL_LOG_JSON")
        json = env == "1" if env is not None else not sys.stderr.isatty()
    renderer = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact.processor(),  # no credential in any log line
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _configured = True


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    if not _configured:
        configure()
    return structlog.get_logger(name)
