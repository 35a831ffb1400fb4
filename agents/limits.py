"""What one agent run may spend before it must stop with its best partial answer.

A pydantic model because it crosses processes: it is part of a council's declaration
(serialised, digested into recordings) and of what `council serve` loads elsewhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """None on an axis means no limit on it (the caller's deadline and budget still apply).

    They hold inside the last turn too: a turn starts only if the tokens and money left
    could pay for one like the last and the time left is longer than the last took, and a
    fifth of the time is kept for the closing turn.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(
        default=20,
        ge=1,
        description="turns whose code runs, per request; then one closing turn that calls no peer",
    )
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

    @property
    def child_depths(self) -> int:
        """At how many depths an agent's child agents can run (2 up to `depth`): each has
        its own share of the agent's concurrency, and one REPL worker per request."""
        return max(0, self.depth - 1)

    def summary(self) -> str:
        """Only what differs from the defaults, for `council show`."""
        default = Limits()
        parts = [f"{k}={v}" for k, v in self.model_dump().items() if getattr(default, k) != v]
        return ", ".join(parts)

    def for_child(self, asked: dict[str, object], remaining: Limits | None = None) -> Limits:
        """These limits narrowed by what a parent asked for its child (`rlm(..., iterations=5)`).

        A child may be given less than the agent's own limits (and than what the parent
        has left), never more: a larger ask is refused with a `ValueError` saying why.
        """
        known = {k: v for k, v in asked.items() if k in CHILD_LIMITS and v is not None}
        if not known:
            return self
        try:
            narrowed = self.model_copy(update=known)
            Limits.model_validate(narrowed.model_dump())
        except Exception as e:
            raise ValueError(f"child limits {known} are not valid limits: {e}") from None
        caps = remaining or self
        for key, value in known.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"child limit {key}={value!r} must be a number")
            cap = getattr(caps, key)
            if cap is not None and value > cap:
                raise ValueError(
                    f"a child may not have {key}={value}: the parent has {key}={cap:g} left; "
                    f"ask for at most {cap:g}, or raise the agent's own limits"
                )
        return narrowed


CHILD_LIMITS = ("iterations", "tokens", "cost", "seconds")
"""The limits a parent may set for one child call, as keyword arguments of `rlm(...)`."""


class Compaction(BaseModel):
    """When and how an agent folds its older turns to stay inside its model's window.

    Before each model call, if the prompt would pass `at` of the window, the turns before
    the latest `keep` are replaced by a short summary (by the agent's own model, or the
    LLM peer named in `model`); the system prompt, the request and the latest turns stay
    as they were, and every turn stays readable in the REPL as `transcript`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int | None = Field(
        default=None,
        ge=256,
        description="the model's context window in tokens; None: from litellm's model info",
    )
    at: float = Field(default=0.75, gt=0.1, le=0.95, description="share of the window")
    keep: int = Field(default=2, ge=0, le=20, description="latest turns kept verbatim")
    model: str | None = Field(
        default=None, description="LLM peer writing the summary; None: the agent's own model"
    )
    enabled: bool = True
