"""A scripted OpenAI-compatible chat.completions server that counts what it is asked.

Run as a process (`python tests/counting_stub.py N DELAY`); it prints `READY <port>`.

- model `*root`: the first turn (no assistant message yet) answers with code that splits
  `context` into N slices, asks the `llm` peer about each (`llm.map`) and finishes with the
  sum of the answers; so the final answer depends on every sub-answer. A later turn
  finishes with what it has.
- any other model: a sub-call, answered after DELAY seconds with a number derived from
  what it was sent (same request, same answer).

`GET /stats` returns {"root": n, "sub": n, "distinct": n, "repeated": n, "in_flight_max": n}:
`repeated` counts sub requests whose exact content was asked before (what a resume asked
twice).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections import Counter

from aiohttp import web

ROOT_CODE = """```python
step = -(-len(context) // {n})
parts = [context[i * step:(i + 1) * step] for i in range({n})]
answers = llm.map(["Give the number for this part."] * {n}, contexts=parts)
FINAL("total " + str(sum(int(str(a).strip()) for a in answers)) + " over " + str(len(answers)))
```"""


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def main() -> None:
    n, delay = int(sys.argv[1]), float(sys.argv[2])
    seen: Counter[str] = Counter()
    stats = {"root": 0, "sub": 0, "in_flight": 0, "in_flight_max": 0, "auth": []}

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        messages = body["messages"]
        model = str(body.get("model", ""))
        auth = request.headers.get("Authorization", "")
        if auth not in stats["auth"]:
            stats["auth"].append(auth)
        if model.endswith("root"):
            stats["root"] += 1
            first = not any(m.get("role") == "assistant" for m in messages)
            text = ROOT_CODE.format(n=n) if first else '```python\nFINAL("late")\n```'
        else:
            stats["sub"] += 1
            stats["in_flight"] += 1
            stats["in_flight_max"] = max(stats["in_flight_max"], stats["in_flight"])
            try:
                await asyncio.sleep(delay)
            finally:
                stats["in_flight"] -= 1
            key = hashlib.sha256(
                json.dumps([_text(m.get("content")) for m in messages]).encode()
            ).hexdigest()
            seen[key] += 1
            text = str(int(key[:6], 16) % 1000)
        return web.json_response(
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            }
        )

    async def get_stats(request: web.Request) -> web.Response:
        out = {k: v for k, v in stats.items() if k != "in_flight"}
        out["distinct"] = len(seen)
        out["repeated"] = sum(c - 1 for c in seen.values())
        return web.json_response(out)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/stats", get_stats)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"READY {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
