"""The REPL runtime: a worker subprocess per agent, where every peer is a Python function.

`agents.repl.host.Repl` is the agent's side; `agents.repl.worker` runs in the subprocess.
Nothing is imported here, so the worker's start-up pays only for what it uses.
"""
