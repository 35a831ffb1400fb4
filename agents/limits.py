"""What one agent run may spend before it must stop with its best partial answer.

A pydantic model because it crosses processes: it is part of a council's declaration
(serialised, digested into recordings) and of what `council serve` loads elsewhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """None on an axis means no limit on it (the caller's deadline and budget still apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(default=20, ge=1, description="model turns per request")
    tokens: int | None = Field(default=None, ge=1, description="tokens, sub-calls included")
    cost: float | None = Field(default=None, gt=0, description="USD, sub-calls included")
    seconds: float | None = Field(default=None, gt=0, description="wall time per request")
    execution: float = Field(
        default=120.0,
        gt=0,
        description="seconds one execution of code may run; past it the REPL is restarted "
        "and the model is told, then gets its next turn",
    )
    depth: int = Field(default=2, ge=0, description="how deep child agents may nest")
    at_max_depth: Literal["fail", "llm"] = Field(
        default="fail",
        description="what a child call past `depth` becomes: a failure, or a plain model call",
    )

    def summary(self) -> str:
        """Only what differs from the defaults, for `council show`."""
        default = Limits()
        parts = [f"{k}={v}" for k, v in self.model_dump().items() if getattr(default, k) != v]
        return ", ".join(parts)
