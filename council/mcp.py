"""Declaring an MCP server as a peer, and telling agents its tools.

    Council(
        entry="chair",
        peers=[
            Agent("chair", model="gpt-4o-mini", calls=["files"]),
            MCP("files", command=["npx", "-y", "@modelcontextprotocol/server-filesystem", "."]),
            MCP("search", url="http://localhost:8000/mcp"),
        ],
    )

The agents allowed to call `files` get `files("read_file", path=...)` in their REPL (the
peer is served by agents/mcp.py). Its tools are learnt when a session starts, from the
peer itself over the bus (so an MCP peer served by another process works the same, and a
replay asks the live server again), before the agents that call it are built: their
system prompts list each tool with the signature its JSON schema gives.

The declaration holds no secrets (it is recorded into cassettes): `env` names variables
passed from the serving process's environment to the server, never their values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from agents.prompt import PeerSpec
from channels import log

_log = log.get("council.mcp")

SIGNATURE = "(tool: str = '', **arguments) -> Any"
LEARN_TIMEOUT = 35.0


class MCP(BaseModel):
    """An MCP server (a command started over stdio, or an http(s) URL) as a peer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mcp"] = "mcp"
    name: str
    description: str = ""
    command: list[str] = Field(default_factory=list)
    url: str | None = None
    env: list[str] = Field(
        default_factory=list, description="names of variables passed on to the server"
    )
    cwd: str | None = None
    concurrency: int = Field(default=8, ge=1)
    _tools: list[dict[str, Any]] | None = PrivateAttr(default=None)
    _asked: bool = PrivateAttr(default=False)

    def __init__(self, name: str | None = None, /, **data: Any) -> None:
        if name is not None:
            data["name"] = name
        super().__init__(**data)

    @model_validator(mode="after")
    def _one_server(self) -> MCP:
        if bool(self.command) == bool(self.url):
            raise ValueError(
                f"MCP peer {self.name!r} needs either command=[...] (a server started over "
                "stdio) or url='http(s)://...' (Streamable HTTP, or SSE for a URL ending /sse)"
            )
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"MCP peer {self.name!r}: url must start with http:// or https://")
        return self

    # -- what the council reads (the same interface as council.declare's peers) ------------

    @property
    def signature(self) -> str:
        return SIGNATURE

    @property
    def calls_(self) -> list[str]:
        return []

    def derived(self) -> dict[str, str]:
        return {}

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The tools learnt from the server (None until a session learnt them)."""
        return self._tools

    def learn(self, tools: list[dict[str, Any]]) -> None:
        self._tools = [
            {k: t.get(k, "") for k in ("name", "description", "signature")}
            for t in tools
            if isinstance(t, dict) and t.get("name")
        ]

    def spec(self) -> PeerSpec:
        from agents.mcp import describe_tools

        about = self.description or f"the MCP server {self.where}"
        if self._tools is None:
            about += f"; call {self.name.replace('-', '_')}() to list its tools"
        else:
            about += "\n  " + describe_tools(self.name, self._tools)
        return PeerSpec(self.name, about, SIGNATURE, concurrency=self.concurrency)

    @property
    def where(self) -> str:
        return self.url or " ".join(self.command)

    def line(self) -> str:
        return f"mcp  {self.where}"

    def peer(self) -> Any:
        """The runtime peer (agents/mcp.py) serving this server's tools."""
        from agents.mcp import MCPPeer, passed_env

        return MCPPeer(
            self.name,
            self.url or self.command,
            env=passed_env(self.env),
            cwd=self.cwd,
            description=self.description,
            concurrency=self.concurrency,
        )


def servers_first(council: Any, names: Iterable[str]) -> list[str]:
    """`names` with the MCP peers first, so their tools are known before agents are built."""
    names = list(names)
    return sorted(names, key=lambda n: not isinstance(council.peer(n), MCP))


def mcp_callees(council: Any, peer: str) -> list[str]:
    """The MCP peers that `peer` may call."""
    return [c for c in council.peer(peer).calls_ if isinstance(council.peer(c), MCP)]


async def learn_tools(
    council: Any, bus: Any, timeout: float = LEARN_TIMEOUT, *, only: Iterable[str] | None = None
) -> None:
    """Ask each MCP peer of `council` not yet asked for its tools (once per declaration:
    a later session reuses what the first learnt).

    A peer that does not answer is logged and left as is: its callers are told to list its
    tools themselves, and the council starts anyway.
    """
    wanted = None if only is None else set(only)
    todo = [
        p
        for p in council.peers
        if isinstance(p, MCP) and not p._asked and (wanted is None or p.name in wanted)
    ]

    async def ask(p: MCP) -> None:
        p._asked = True
        try:
            reply = await bus.call(p.name, "", timeout=timeout)
        except Exception as e:
            _log.warning("mcp.tools_unknown", peer=p.name, error=str(e))
            return
        if isinstance(reply.value, list):
            p.learn(reply.value)

    async with anyio.create_task_group() as tg:
        for p in todo:
            tg.start_soon(ask, p)
