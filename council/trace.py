"""`council trace CASSETTE`: who called whom, with what, at what cost, from a recording.

The tree comes from the calls alone (each Call names its parent call), so it is the same
whether the session ran in one process or many. The terminal view folds long fan-outs;
`--html` writes one self-contained page (no network assets) with a collapsible tree, a
details pane and a timeline.

A damaged cassette is traced too: every line that cannot be used (not JSON, a cut-off last
line, a message type this version does not know, an edited entry) is listed as such, and
everything else is shown. Whatever is shown is masked for credentials (channels/redact.py)
again, for cassettes recorded before masking existed.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels import redact
from channels.messages import Call, Failure, Ref, Reply, Usage
from council.cassette import Cassette, CassetteError


@dataclass
class Node:
    call: Call
    t0: float
    t1: float | None
    status: str  # "ok", a failure kind, "cancelled" (caller gave up) or "open" (no answer yet)
    usage: Usage
    value: Any = None
    error: str = ""
    children: list[Node] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration(self) -> float | None:
        return None if self.t1 is None else self.t1 - self.t0

    @property
    def models(self) -> list[str]:
        """Models that answered this very call (from its completion events)."""
        return sorted({e["model"] for e in self.events if e.get("type") == "completion"})

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def shape(self) -> tuple[Any, ...]:
        """What this subtree did, without ids and times: equal for a faithful replay."""
        return (
            self.call.caller,
            self.call.callee,
            self.call.prompt,
            json.dumps(self.value, sort_keys=True, default=str),
            self.status,
            tuple(sorted((c.shape() for c in self.children), key=repr)),
        )


@dataclass
class Trace:
    cassette: Cassette
    roots: list[Node]
    nodes: dict[str, Node]

    @property
    def start(self) -> float:
        return min((n.t0 for n in self.nodes.values()), default=self.cassette.header.started)

    @property
    def end(self) -> float:
        ends = [n.t1 or n.t0 for n in self.nodes.values()]
        return max(ends, default=self.start)

    def totals(self) -> dict[str, Any]:
        total = Usage()
        for r in self.roots:
            total = total + r.usage
        failures = sum(1 for n in self.nodes.values() if n.status not in ("ok",))
        return {
            "calls": len(self.nodes),
            "failures": failures,
            "tokens": total.tokens,
            "cost": total.cost,
            "model_calls": total.model_calls,
            "seconds": round(self.end - self.start, 6),
        }


def build(cassette: Cassette) -> Trace:
    nodes: dict[str, Node] = {}
    for it in cassette.interactions():
        a = it.answer
        if isinstance(a, Reply):
            status, usage, value, error = "ok", a.usage, a.value, ""
        elif isinstance(a, Failure):
            status, usage, value, error = a.kind, a.usage, a.partial, a.message
        elif it.cancel is not None:
            status, usage, value, error = "cancelled", Usage(), None, it.cancel.reason
        else:
            status, usage, value, error = "open", Usage(), None, "no answer was recorded"
        end = it.t_answer if it.t_answer is not None else it.t_cancel
        nodes.setdefault(it.call.id, Node(it.call, it.t, end, status, usage, value, error))
    for e, m in cassette.messages():
        if e.kind == "event" and getattr(m, "call", None) in nodes:
            nodes[m.call].events.append(m.model_dump(mode="json", by_alias=True))  # type: ignore[union-attr]
    roots: list[Node] = []
    for n in nodes.values():
        parent = nodes.get(n.call.parent) if n.call.parent else None
        (parent.children if parent else roots).append(n)
    for n in nodes.values():
        n.children.sort(key=lambda c: c.t0)
    roots.sort(key=lambda c: c.t0)
    return Trace(cassette, roots, nodes)


# -- terminal -----------------------------------------------------------------------------


def preview(value: Any, n: int = 60) -> str:
    if value is None:
        return ""
    if isinstance(value, Ref):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _money(cost: float | None) -> str:
    return "$?" if cost is None else f"${cost:.4f}"


def _tokens(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else str(n)


def request(call: Call) -> tuple[str, bool]:
    """What a call asked, in full, and whether it is quoted text: the prompt; for a call with
    none, a model call's last message, a REPL's `op` (as `set_context`) or the args. The
    terminal and the page both label calls with it."""
    if call.prompt:
        return call.prompt, True
    messages = call.args.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return _as_text(messages[-1].get("content", "")), True
    if "op" in call.args:
        return f"[{call.args['op']}]", False
    return (_as_text(call.args), True) if call.args else ("", True)


def _asked(call: Call) -> str:
    text, quoted = request(call)
    return f'"{preview(text, 50)}"' if quoted else text


def _line(n: Node) -> str:
    who = f"{n.call.callee} <- {n.call.caller}"
    if n.models:
        who += f" [{', '.join(n.models)}]"
    parts = [who, _asked(n.call)]
    if n.status == "ok":
        parts.append(f'=> "{preview(n.value, 40)}"')
    else:
        parts.append(f"!! {n.status}: {preview(n.error, 60)}")
    if n.usage.tokens or n.usage.model_calls:
        parts.append(f"{_tokens(n.usage.tokens)} tok {_money(n.usage.cost)}")
    if n.duration is not None:
        parts.append(f"{n.duration * 1000:.1f} ms" if n.duration < 1 else f"{n.duration:.2f} s")
    return "  ".join(parts)


def render_text(trace: Trace, *, max_children: int = 10, max_depth: int | None = None) -> str:
    h = trace.cassette.header
    tot = trace.totals()
    out = [
        f"session {h.session}  recorded {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(h.started))} UTC"
        f"  rlm-council {h.framework}"
        + (f"  council {h.council_digest[:19]}" if h.council_digest else ""),
        f"{tot['calls']} calls, {tot['failures']} failed, {_tokens(tot['tokens'])} tokens, "
        f"{_money(tot['cost'])}, {tot['model_calls']} model calls, {tot['seconds']:.2f} s",
    ]
    if not trace.cassette.complete:
        out.append(f"(incomplete recording: {trace.cassette.problem})")
    for mark in resumes(trace.cassette):
        out.append(f"(resumed: {mark})")
    damaged = trace.cassette.unusable()
    if damaged:
        out.append(f"({len(damaged)} unusable record(s), left out of the tree:)")
        out.extend(f"  !! {d}" for d in damaged[:50])
        if len(damaged) > 50:
            out.append(f"  !! ... and {len(damaged) - 50} more")

    def emit(n: Node, prefix: str, last: bool, depth: int) -> None:
        out.append(prefix + ("└─ " if last else "├─ ") + _line(n))
        child_prefix = prefix + ("   " if last else "│  ")
        if max_depth is not None and depth >= max_depth and n.children:
            out.append(child_prefix + f"└─ … {len(n.children)} calls below (raise --depth)")
            return
        kids = n.children
        shown = kids if len(kids) <= max_children else kids[:max_children]
        rest = kids[len(shown) :]
        for i, c in enumerate(shown):
            emit(c, child_prefix, i == len(shown) - 1 and not rest, depth + 1)
        if rest:
            sub = [m for c in rest for m in c.walk()]
            failed = sum(1 for m in sub if m.status != "ok")
            use = sum((c.usage for c in rest), Usage())
            out.append(
                child_prefix
                + f"└─ … {len(rest)} more calls ({len(sub)} with their subcalls, {failed} failed, "
                f"{_tokens(use.tokens)} tok {_money(use.cost)}); --all shows them"
            )

    for i, r in enumerate(trace.roots):
        emit(r, "", i == len(trace.roots) - 1, 0)
    return redact.text("\n".join(out))


def resumes(cassette: Cassette) -> list[str]:
    """Where resumed runs took over, in words."""
    out = []
    for e in cassette.entries:
        if e.kind == "mark":
            info = e.msg or {}
            when = time.strftime("%H:%M:%S", time.gmtime(e.t))
            out.append(
                f"at {when} UTC, entry {e.seq}, after {info.get('after', '?')} recorded entries"
            )
    return out


# -- html ---------------------------------------------------------------------------------

_CAP = 20_000


def _cap(text: str) -> str:
    return text if len(text) <= _CAP else text[:_CAP] + f"\n… ({len(text) - _CAP} more characters)"


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Ref):
        return repr(value)
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def page_data(trace: Trace) -> dict[str, Any]:
    t0 = trace.start
    flat: list[dict[str, Any]] = []

    def add(n: Node, parent: int) -> None:
        i = len(flat)
        c = n.call
        flat.append(
            {
                "id": c.id,
                "parent": parent,
                "caller": c.caller,
                "callee": c.callee,
                "prompt": _cap(c.prompt),
                "asked": _cap(request(c)[0]),
                "context": _cap(_as_text(c.context)),
                "args": _cap(_as_text(c.args) if c.args else ""),
                "status": n.status,
                "value": _cap(_as_text(n.value)),
                "error": _cap(n.error),
                "start": round(n.t0 - t0, 6),
                "end": None if n.t1 is None else round(n.t1 - t0, 6),
                "tokens": n.usage.tokens,
                "input_tokens": n.usage.input_tokens,
                "output_tokens": n.usage.output_tokens,
                "cost": n.usage.cost,
                "model_calls": n.usage.model_calls,
                "models": n.models,
                "events": [_cap(json.dumps(e, ensure_ascii=False))[:2000] for e in n.events[:50]],
                "n": 0,
            }
        )
        for ch in n.children:
            add(ch, i)
        flat[i]["n"] = len(flat) - i - 1  # calls below

    for r in trace.roots:
        add(r, -1)
    h = trace.cassette.header
    return {
        "session": h.session,
        "started": h.started,
        "framework": h.framework,
        "council_digest": h.council_digest,
        "models": h.models,
        "complete": trace.cassette.complete,
        "problem": trace.cassette.problem,
        "damaged": [str(d) for d in trace.cassette.unusable()],
        "resumed": resumes(trace.cassette),
        "totals": trace.totals(),
        "span": max(trace.end - t0, 1e-9),
        "nodes": flat,
    }


def render_html(trace: Trace) -> str:
    data = json.dumps(redact.value(page_data(trace)), ensure_ascii=False).replace("</", "<\\/")
    title = html.escape(f"council trace {trace.cassette.header.session}")
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", data)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root{--ok:#2f8f46;--bad:#c0392b;--mut:#6b7280;--sel:#e8f0fe;--bd:#d9dde3}
*{box-sizing:border-box}
body{margin:0;font:13px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1f2328}
header{padding:10px 16px;border-bottom:1px solid var(--bd);background:#f7f8fa}
header h1{font-size:16px;margin:0 0 4px}
header .sum{color:var(--mut)}
main{display:grid;grid-template-columns:minmax(380px,1.2fr) 1fr;height:calc(100vh - 260px);min-height:300px}
#tree{overflow:auto;border-right:1px solid var(--bd);padding:6px 0}
#tree ul{list-style:none;margin:0;padding-left:18px}
#tree>ul{padding-left:6px}
#tree li.collapsed>ul{display:none}
.row{cursor:pointer;white-space:nowrap;padding:1px 6px;border-radius:4px}
.row:hover{background:#f1f3f5}
.row.sel{background:var(--sel)}
.tw{display:inline-block;width:14px;color:var(--mut)}
.who{font-weight:600}
.from{color:var(--mut)}
.pr{color:#374151}
.meta{color:var(--mut);margin-left:6px}
.st-ok{color:var(--ok)} .st-bad{color:var(--bad);font-weight:600}
#detail{overflow:auto;padding:10px 14px}
#detail h2{font-size:14px;margin:0 0 8px}
#detail pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;border:1px solid var(--bd);
 border-radius:4px;padding:6px;max-height:320px;overflow:auto;margin:2px 0 10px}
#detail dt{font-weight:600;margin-top:4px}
#timeline{height:260px;overflow:auto;border-top:1px solid var(--bd);position:relative;padding:4px 0}
#timeline .tl{position:relative;height:14px;margin:1px 0}
#timeline .bar{position:absolute;height:12px;top:1px;border-radius:2px;background:#7aa7e0;min-width:2px;cursor:pointer}
#timeline .bar.bad{background:#e38b80}
#timeline .bar.sel{outline:2px solid #1a56db}
.row.hit{background:#fff3bf} .row.hit.sel{background:#ffe08a}
#search{margin-top:6px;width:min(520px,60vw);padding:3px 6px;font:inherit}
#hits{color:var(--mut);margin-left:8px}
.unk{text-decoration:underline dotted;cursor:help}
.legend{font-size:12px;margin-top:2px}
#timeline .lab{position:absolute;left:4px;font-size:10px;color:var(--mut);pointer-events:none;white-space:nowrap}
</style></head>
<body>
<header><h1 id="title"></h1><div class="sum" id="sum"></div>
<input id="search" type="search" placeholder="search calls: peer, request, answer, error, model" aria-label="search calls"><span id="hits"></span>
<ul id="damaged"></ul></header>
<main><div id="tree" role="tree"></div><div id="detail"><p class="sum">Click a call to see it.</p></div></main>
<div id="timeline" aria-label="timeline"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
(function(){
"use strict";
var D=JSON.parse(document.getElementById("data").textContent);
var N=D.nodes, kids=N.map(function(){return [];}), rows=[], bars=[];
N.forEach(function(n,i){ if(n.parent>=0) kids[n.parent].push(i); });
function el(tag,cls,text){var e=document.createElement(tag); if(cls)e.className=cls; if(text!=null)e.textContent=text; return e;}
var UNKNOWN="cost unknown: no price is known for a model used here (a local or scripted model, or one litellm has no price for)";
function money(c){return c==null?"$?":"$"+c.toFixed(4);}
function cost(c){var e=el("span",c==null?"unk":null,money(c)); if(c==null)e.title=UNKNOWN; return e;}
function dur(n){if(n.end==null)return "";var d=n.end-n.start;return d<1?(d*1000).toFixed(1)+" ms":d.toFixed(2)+" s";}
function pv(s,k){s=(s||"").replace(/\\s+/g," ");return s.length>k?s.slice(0,k-1)+"\\u2026":s;}
var T=D.totals;
document.getElementById("title").textContent="session "+D.session+(D.complete?"":" (incomplete recording)");
var sum=document.getElementById("sum"); sum.textContent=T.calls+" calls \\u00b7 "+T.failures+" failed \\u00b7 "+T.tokens+" tokens \\u00b7 "+money(T.cost)+" \\u00b7 "+T.model_calls+" model calls \\u00b7 "+T.seconds.toFixed(3)+" s \\u00b7 recorded "+new Date(D.started*1000).toISOString()+" \\u00b7 rlm-council "+D.framework;
if(N.some(function(n){return n.cost==null&&n.model_calls>0;})||T.cost==null){var lg=el("div","legend","$? = "+UNKNOWN); lg.id="legend"; sum.appendChild(lg);}
var dm=document.getElementById("damaged");
if(!D.complete&&D.problem)dm.appendChild(el("li","st-bad","incomplete recording: "+D.problem));
(D.resumed||[]).forEach(function(r){dm.appendChild(el("li","sum","resumed "+r));});
(D.damaged||[]).forEach(function(d){dm.appendChild(el("li","st-bad","unusable record, left out: "+d));});
var selected=-1;
function select(i){
  if(selected>=0){rows[selected].classList.remove("sel"); if(bars[selected])bars[selected].classList.remove("sel");}
  selected=i; rows[i].classList.add("sel"); if(bars[i])bars[i].classList.add("sel");
  var n=N[i], d=document.getElementById("detail"); d.textContent="";
  d.appendChild(el("h2",null,n.caller+" \\u2192 "+n.callee+"  ["+n.status+"]"));
  var dl=el("dl");
  [["call",n.id],["time","+"+n.start.toFixed(4)+" s, "+(dur(n)||"no answer")],
   ["usage",n.tokens+" tokens ("+n.input_tokens+" in, "+n.output_tokens+" out), "+money(n.cost)+", "+n.model_calls+" model calls (whole subtree)"],
   ["calls below",String(n.n)]].forEach(function(p){dl.appendChild(el("dt",null,p[0]));dl.appendChild(el("dd",null,p[1]));});
  d.appendChild(dl);
  [["request",n.prompt?"":n.asked],["prompt",n.prompt],["context",n.context],["args",n.args],[n.status==="ok"?"answer":"partial",n.value],["error",n.error],["events",n.events.join("\\n")]].forEach(function(p){
    if(p[1]){d.appendChild(el("dt",null,p[0]));d.appendChild(el("pre",null,p[1]));}
  });
}
function reveal(i){
  for(var p=N[i].parent;p>=0;p=N[p].parent){rows[p].parentNode.classList.remove("collapsed");rows[p].querySelector(".tw").textContent="\\u25be";}
  rows[i].scrollIntoView({block:"nearest"});
}
function toggle(li,tw){
  var c=li.classList.toggle("collapsed"); tw.textContent=c?"\\u25b8":"\\u25be";
}
function build(i,depth){
  var n=N[i], li=el("li"); li.setAttribute("role","treeitem"); li.dataset.i=i;
  var row=el("div","row"); row.dataset.callee=n.callee;
  var has=kids[i].length>0, tw=el("span","tw",has?(depth<1?"\\u25be":"\\u25b8"):"\\u00b7");
  if(has&&depth>=1)li.classList.add("collapsed");
  var bad=n.status!=="ok";
  row.appendChild(tw); row.appendChild(el("span","who",n.callee));
  row.appendChild(el("span","from"," \\u2190 "+n.caller+(n.models.length?" ["+n.models.join(", ")+"]":"")+"  "));
  var q=/^\\[[a-z_]+\\]$/.test(n.asked);
  row.appendChild(el("span","pr",q?n.asked:"\\u201c"+pv(n.asked,90)+"\\u201d"));
  row.title=n.callee+" \\u2190 "+n.caller+": "+pv(n.asked,400);
  row.appendChild(el("span","meta "+(bad?"st-bad":"st-ok")," "+n.status));
  var m=[]; if(n.end!=null)m.push(dur(n)); if(has)m.push(n.n+" below");
  if(n.tokens){var u=el("span","meta",n.tokens+" tok "); u.appendChild(cost(n.cost)); row.appendChild(u);}
  row.appendChild(el("span","meta",m.join(" \\u00b7 ")));
  row.addEventListener("click",function(){ if(has)toggle(li,tw); select(i); });
  rows[i]=row; li.appendChild(row);
  if(has){var ul=el("ul"); ul.setAttribute("role","group"); kids[i].forEach(function(k){ul.appendChild(build(k,depth+1));}); li.appendChild(ul);}
  return li;
}
var top=el("ul"); N.forEach(function(n,i){ if(n.parent<0) top.appendChild(build(i,0)); });
document.getElementById("tree").appendChild(top);
var tl=document.getElementById("timeline"), span=D.span;
N.forEach(function(n,i){
  var r=el("div","tl"), b=el("div","bar"+(n.status!=="ok"?" bad":""));
  var end=n.end==null?span:n.end;
  b.style.left=(100*n.start/span)+"%"; b.style.width=Math.max(0.2,100*(end-n.start)/span)+"%";
  b.title=n.caller+" \\u2192 "+n.callee+": "+pv(n.asked,200)+" ("+(dur(n)||"no answer")+")";
  b.addEventListener("click",function(){reveal(i);select(i);});
  var lab=el("span","lab",n.callee+"  "+pv(n.asked,60)); lab.style.left="calc("+Math.min(100*n.start/span,70)+"% + 4px)";
  bars[i]=b; r.appendChild(b); r.appendChild(lab); tl.appendChild(r);
});
var hay=N.map(function(n){return [n.callee,n.caller,n.asked,n.prompt,n.context,n.value,n.error,n.models.join(" "),n.id,n.status].join("\\n").toLowerCase();});
var hits=[], hitAt=-1, box=document.getElementById("search");
function next(){ if(!hits.length)return; hitAt=(hitAt+1)%hits.length; reveal(hits[hitAt]); select(hits[hitAt]); }
function search(q){
  hits.forEach(function(i){rows[i].classList.remove("hit");});
  hits=[]; hitAt=-1; q=q.trim().toLowerCase();
  if(q)N.forEach(function(n,i){ if(hay[i].indexOf(q)>=0){hits.push(i); rows[i].classList.add("hit");} });
  document.getElementById("hits").textContent=q?hits.length+(hits.length===1?" match":" matches")+(hits.length>1?" (Enter: next)":""):"";
  next();
}
box.addEventListener("input",function(){search(box.value);});
box.addEventListener("keydown",function(e){ if(e.key==="Enter"){e.preventDefault(); next();} });
if(N.length)select(0);
})();
</script>
</body></html>
"""


# -- command ------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `trace` to the `council` command's subparsers; dispatch with `run(args)`."""
    p = sub.add_parser("trace", help="show a recorded session as a call tree")
    _arguments(p)
    p.set_defaults(func=run)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cassette", type=Path, help="a cassette (.jsonl) written by the recorder")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write a self-contained page")
    p.add_argument(
        "--max-children",
        type=int,
        default=10,
        help="calls shown under one caller before the rest are folded (default 10)",
    )
    p.add_argument("--all", action="store_true", help="fold nothing")
    p.add_argument("--depth", type=int, default=None, help="show this many levels")


def run(args: argparse.Namespace) -> int:
    try:
        cassette = Cassette.load(args.cassette, lenient=True)
        trace = build(cassette)
    except CassetteError as e:
        print(f"council trace: {e}", file=sys.stderr)
        return 1
    max_children = 10**9 if args.all else args.max_children
    print(render_text(trace, max_children=max_children, max_depth=args.depth))
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(trace), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="council trace", description=__doc__)
    _arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
