"""A real MCP server (the official SDK's MCPServer over stdio) for tests/test_mcp.py.

Its tools cover what an MCP peer must handle: typed arguments with a default, a structured
result, a tool that reports an error, and one that kills the server in the middle of a call.
"""

import os
import sys

from mcp.server.mcpserver import MCPServer

app = MCPServer("notes")
NOTES = {"plan": "ship on friday", "risks": "the build is slow"}


@app.tool()
def add(a: int, b: int = 2) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def read_note(name: str) -> str:
    """Read a note by its name."""
    if name not in NOTES:
        raise KeyError(f"no note {name!r}")
    return NOTES[name]


@app.tool()
def stats(words: list[str]) -> dict[str, int]:
    """Count words and characters."""
    return {"words": len(words), "chars": sum(len(w) for w in words), "pid": os.getpid()}


@app.tool()
async def slow(seconds: float) -> str:
    """Takes its time."""
    import anyio

    await anyio.sleep(seconds)
    return "finally"


@app.tool()
def crash() -> str:
    """Ends the server process in the middle of the call."""
    sys.stderr.write("notes server: crashing on purpose\n")
    os._exit(3)


if __name__ == "__main__":
    if len(sys.argv) == 3:  # over HTTP: `streamable-http PORT` or `sse PORT`
        app.run(sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]))
    else:
        app.run()
