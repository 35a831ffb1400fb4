"""An MCP server's tools served as one peer on the bus.

The process serving the peer holds the MCP client session (the official `mcp` SDK: a
command started as a subprocess over stdio, or a Streamable HTTP / SSE URL). A call's
prompt names the tool and its keyword arguments are the tool's arguments, so in a REPL

    files("read_file", path="notes.txt")

is one MCP `tools/call`, and `files()` (no tool) answers with the tool list. One peer per
server, not one per tool: the rights, the recording and the trace name one callee, and a
server may add tools without the declaration changing.

A tool that reports an error is a `peer_error`; arguments that do not fit the tool's JSON
schema are a `bad_request` naming the signature; a server that dies mid-call is
`unavailable`, and the next call starts (or reconnects to) it afresh.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus

from channels import log, subjects
from channels.bus import Bus
from channels.errors import BadRequest, CouncilError, PeerError, Unavailable
from channels.messages import Call

_log = log.get("council.mcp")

CONNECT_TIMEOUT = 30.0  # seconds to start a server and finish the MCP handshake


class MCPUnavailable(CouncilError, RuntimeError):
    """The `mcp` package is not installed."""


def _sdk() -> Any:
    try:
        import mcp
    except ImportError as e:
        raise MCPUnavailable(
            f"MCP peers need the official MCP SDK ({e}); install it with "
            "pip install 'rlm-council[mcp]'"
        ) from e
    return mcp


# -- JSON schema -> a signature a model reads ---------------------------------------------

_SCALARS = {
    "string": "str",
    "integer": "int",
    "number": "float",
    "boolean": "bool",
    "null": "None",
    "object": "dict",
}


def type_name(schema: Any) -> str:
    """A Python-looking type for a JSON schema: {"type": "array", "items": {"type":
    "string"}} -> list[str]."""
    if not isinstance(schema, dict):
        return "Any"
    if "enum" in schema:
        return "Literal[" + ", ".join(repr(v) for v in schema["enum"]) + "]"
    if "const" in schema:
        return f"Literal[{schema['const']!r}]"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(dict.fromkeys(type_name(s) for s in schema[key]))
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(type_name({**schema, "type": k}) for k in kind)
    if kind == "array":
        return f"list[{type_name(schema.get('items'))}]"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"dict[str, {type_name(schema['additionalProperties'])}]"
    return _SCALARS.get(kind, "Any")


def _wrapped_result(output_schema: Any) -> dict[str, Any] | None:
    """The schema of `result` when a server wraps a non-object return as {"result": ...}
    (what the SDK's MCPServer does for `-> int`, `-> str`, ...)."""
    if not isinstance(output_schema, dict):
        return None
    props = output_schema.get("properties")
    if isinstance(props, dict) and set(props) == {"result"}:
        return props["result"]
    return None


def tool_signature(input_schema: Any, output_schema: Any = None) -> str:
    """`(path: str, limit: int = 10) -> str` from a tool's input (and output) schema."""
    schema = input_schema if isinstance(input_schema, dict) else {}
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    parts = []
    for name, prop in sorted(props.items(), key=lambda kv: kv[0] not in required):
        part = f"{name}: {type_name(prop)}"
        if name not in required:
            default = prop.get("default") if isinstance(prop, dict) else None
            part += f" = {default!r}"
        parts.append(part)
    if output_schema is None:
        ret = ""
    else:
        inner = _wrapped_result(output_schema)
        ret = f" -> {type_name(inner if inner is not None else output_schema)}"
    return f"({', '.join(parts)}){ret}"


def describe_tools(peer: str, tools: Sequence[dict[str, Any]]) -> str:
    """What a model reads about the server: one line per tool, called through the peer."""
    fn = peer.replace("-", "_")
    lines = [f'MCP tools, called as {fn}("<tool>", arg=...); {fn}() lists them:']
    for t in tools:
        desc = " ".join(str(t.get("description") or "").split())
        lines.append(
            f'    {fn}("{t["name"]}", ...) with {t["signature"]}' + (f": {desc}" if desc else "")
        )
    return "\n".join(lines)


# -- the peer ------------------------------------------------------------------------------


class MCPPeer:
    """Serve the tools of MCP server `server` (a command line, or an http(s) URL) as `name`."""

    def __init__(
        self,
        name: str,
        server: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        description: str = "",
        concurrency: int = 8,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.name = subjects.check_name(name, "peer name")
        if isinstance(server, str) and not server.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {server!r}: give a command as a list, or an http(s) URL")
        if not isinstance(server, str) and not server:
            raise ValueError(f"MCP peer {name!r} has an empty command")
        self.server = server if isinstance(server, str) else list(server)
        self.env = dict(env or {})
        self.cwd = cwd
        self.description = description
        self.concurrency = concurrency
        self.connect_timeout = connect_timeout
        self.tools: dict[str, dict[str, Any]] = {}
        self._client: Any = None
        self._up = anyio.Event()
        self._lost = anyio.Event()
        self._retry = anyio.Event()
        self._error: str | None = None
        self._generation = 0

    def __repr__(self) -> str:
        return f"<MCPPeer {self.name} {self._where()}>"

    def _where(self) -> str:
        return self.server if isinstance(self.server, str) else " ".join(self.server)

    def _target(self) -> Any:
        mcp = _sdk()
        if isinstance(self.server, str):
            if self.server.rstrip("/").endswith("/sse"):
                from mcp.client.sse import sse_client

                return sse_client(self.server)  # a plain URL string means Streamable HTTP
            return self.server
        command, *args = self.server
        return mcp.StdioServerParameters(
            command=sys.executable if command == "python" else command,
            args=args,
            env=self.env or None,
            cwd=self.cwd,
        )

    async def run(self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        _sdk()  # a missing SDK is an error now, not on the first call
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._hold)
            await bus.serve(
                self.name, self.handle, concurrency=self.concurrency, task_status=task_status
            )

    async def _hold(self) -> None:
        """Keep one client session open. After a loss (or a failed start) the next one is
        opened when a call asks for it, so a server that dies at once is not restarted in a
        loop. `_up` is set when an attempt has an outcome: a client, or `_error`."""
        mcp = _sdk()
        while True:
            self._lost = anyio.Event()
            connected = False
            try:
                with anyio.CancelScope(
                    deadline=anyio.current_time() + self.connect_timeout
                ) as scope:
                    async with mcp.Client(self._target()) as client:
                        scope.deadline = math.inf  # the deadline was for starting up
                        connected = True
                        await self._serve_with(client)
                if scope.cancelled_caught and not connected:
                    raise TimeoutError
            except Exception as e:
                if not connected:
                    self._error = (
                        f"could not start or reach the MCP server {self._where()}: {_why(e)}"
                    )
                    _log.warning("mcp.unreachable", peer=self.name, error=self._error)
                    self._up.set()
                else:  # a dead server's transport may complain on the way out
                    _log.debug("mcp.closed", peer=self.name, error=_why(e))
            finally:
                self._client = None
            await self._retry.wait()
            self._retry = anyio.Event()

    async def _serve_with(self, client: Any) -> None:
        try:
            listing = await client.list_tools()
        except Exception as e:
            self._error = f"the MCP server {self._where()} did not list its tools: {_why(e)}"
            _log.warning("mcp.no_tools", peer=self.name, error=self._error)
            self._up.set()
            return
        self.tools = {t.name: _tool_info(t) for t in listing.tools}
        self._client, self._error = client, None
        self._generation += 1
        _log.info("mcp.connected", peer=self.name, tools=sorted(self.tools))
        self._up.set()
        await self._lost.wait()
        self._error = "the MCP server went away"

    async def _session(self) -> Any:
        if self._client is None:
            if self._up.is_set():  # the last attempt is over: ask for a new one
                self._up = anyio.Event()
                self._retry.set()
            with anyio.move_on_after(self.connect_timeout + 1):
                await self._up.wait()
        if self._client is None:
            raise Unavailable(
                f"{self.name}: {self._error or 'the MCP server is not connected'}; "
                "check the server's command or URL (its stderr is shown above)"
            )
        return self._client

    def _drop(self, generation: int) -> None:
        """The client of `generation` is broken: no call uses it again."""
        if generation == self._generation and self._client is not None:
            self._client = None
            self._lost.set()

    async def handle(self, call: Call) -> Any:
        client = await self._session()
        if not call.prompt:
            if call.args or call.context is not None:
                raise BadRequest(
                    f'{self.name}: name the tool first, e.g. {self.name}("tool", arg=...); '
                    f"its tools: {', '.join(self.tools) or '(none)'}"
                )
            return list(self.tools.values())
        tool = self.tools.get(call.prompt)
        if tool is None:
            raise BadRequest(
                f"{self.name} has no tool {call.prompt!r}; its tools: "
                f"{', '.join(self.tools) or '(none)'} (call {self.name}() to list them)"
            )
        arguments = _arguments(self.name, tool, call)
        generation = self._generation
        mcp = _sdk()
        try:  # no MCP read timeout: the call's deadline cancels it (the bus's scope)
            result = await client.call_tool(tool["name"], arguments)
        except mcp.MCPError as e:
            if e.error.code != _connection_closed():
                raise PeerError(f"{self.name}.{tool['name']}: the server refused: {e}") from None
            self._drop(generation)
            raise Unavailable(
                f"{self.name}: the MCP server failed during {tool['name']} ({_why(e)}); "
                "it is restarted for the next call"
            ) from None
        except Exception as e:  # the transport broke
            self._drop(generation)
            raise Unavailable(
                f"{self.name}: the MCP server failed during {tool['name']} ({_why(e)}); "
                "it is restarted for the next call"
            ) from None
        text = "\n".join(getattr(c, "text", "") for c in result.content if hasattr(c, "text"))
        if result.is_error:
            raise PeerError(f"{self.name}.{tool['name']} failed: {text or 'no message'}")
        return _value(result, text)


def _connection_closed() -> int:
    from mcp_types import CONNECTION_CLOSED

    return CONNECTION_CLOSED


def _why(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_why(x) for x in e.exceptions)
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _tool_info(tool: Any) -> dict[str, Any]:
    return {
        "name": tool.name,
        "description": tool.description or "",
        "signature": tool_signature(tool.input_schema, tool.output_schema),
        "input_schema": tool.input_schema,
        "output_schema": tool.output_schema,
    }


def _arguments(peer: str, tool: dict[str, Any], call: Call) -> dict[str, Any]:
    """The call's args as the tool's arguments, checked against its schema's names (the
    server validates the values)."""
    schema = tool["input_schema"] or {}
    props = schema.get("properties") or {}
    arguments = dict(call.args)
    if call.context is not None:
        if "context" not in props or "context" in arguments:
            raise BadRequest(
                f"{peer}: tool {tool['name']} takes no context; pass its arguments by name: "
                f"{tool['name']}{tool['signature']}"
            )
        arguments["context"] = call.context
    open_ended = schema.get("additionalProperties", True) is not False and not props
    unknown = [a for a in arguments if a not in props] if not open_ended else []
    missing = [r for r in schema.get("required") or [] if r not in arguments]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"no argument {', '.join(map(repr, unknown))}")
        if missing:
            problems.append(f"missing {', '.join(map(repr, missing))}")
        raise BadRequest(
            f"{peer}: tool {tool['name']} has {' and '.join(problems)}; "
            f"it takes {tool['signature']}"
        )
    return arguments


def _value(result: Any, text: str) -> Any:
    """The tool's answer as a JSON value: its structured content (unwrapped from the SDK's
    {"result": ...}), else its text, else its content blocks as JSON."""
    structured = result.structured_content
    if structured is not None:
        if isinstance(structured, dict) and set(structured) == {"result"}:
            return _finite(structured["result"])
        return _finite(structured)
    if all(hasattr(c, "text") for c in result.content):
        return text
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result.content]


def _finite(value: Any) -> Any:
    """JSON without NaN or infinities (the bus refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value


def passed_env(names: Sequence[str]) -> dict[str, str]:
    """The variables named, from this process's environment (missing ones left out)."""
    return {n: os.environ[n] for n in names if n in os.environ}
