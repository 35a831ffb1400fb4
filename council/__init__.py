"""Declaring councils, running sessions, recording and replay, the CLI.

from council import Agent, Council, Function, Human, LLM, Limits, MCP, Session, run

For tests: `FunctionModel`, `ScriptedModel` and `ScriptedHuman` stand in for models and
people (`Session(council, models={"chair": ScriptedModel([...])}, humans={...})`), and
the typed errors a call can end with are here to catch.
"""

from agents.function import Peers
from agents.human import ScriptedHuman
from agents.limits import Compaction, Limits
from agents.models import FunctionModel, ModelResponse, ScriptedModel, ScriptError
from channels.errors import (
    BadRequest,
    BudgetExhausted,
    CallCancelled,
    CallFailed,
    CallTimeout,
    CouncilError,
    DepthExceeded,
    PeerError,
    PermissionDenied,
    Unavailable,
)
from council.declare import LLM, MCP, Agent, Council, Function, Human, TopologyError
from council.session import Result, Session, run

__all__ = [
    "LLM",
    "MCP",
    "Agent",
    "BadRequest",
    "BudgetExhausted",
    "CallCancelled",
    "CallFailed",
    "CallTimeout",
    "Compaction",
    "Council",
    "CouncilError",
    "DepthExceeded",
    "Function",
    "FunctionModel",
    "Human",
    "Limits",
    "ModelResponse",
    "PeerError",
    "Peers",
    "PermissionDenied",
    "Result",
    "ScriptError",
    "ScriptedHuman",
    "ScriptedModel",
    "Session",
    "TopologyError",
    "Unavailable",
    "run",
]
