"""Declaring councils, running sessions, recording and replay, the CLI.

from council import Agent, Council, Function, Human, LLM, Limits, MCP, Session, run
"""

from agents.function import Peers
from agents.limits import Limits
from council.declare import LLM, MCP, Agent, Council, Function, Human, TopologyError
from council.session import Result, Session, run

__all__ = [
    "LLM",
    "MCP",
    "Agent",
    "Council",
    "Function",
    "Human",
    "Limits",
    "Peers",
    "Result",
    "Session",
    "TopologyError",
    "run",
]
