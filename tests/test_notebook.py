"""`run()` works in a Jupyter notebook, whose cells run inside the kernel's event loop.

nbclient executes a real notebook on a real IPython kernel started from this venv's Python;
the cells call `council.run` with a scripted model, twice, and a cell checks that the
session left no child process behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

CELLS = [
    "import asyncio, sys\n"
    "asyncio.get_running_loop()  # what made anyio.run() refuse: a loop runs in this thread\n"
    "print('python', sys.executable)",
    "from council import Agent, Council, FunctionModel, run\n"
    "def chair(messages, request, context):\n"
    "    return f'FINAL({len(context)})'\n"
    "council = Council(entry='chair', peers=[Agent('chair', model='gpt-4o-mini')])\n"
    "result = run(council, 'How long?', context='abcd', models={'chair': FunctionModel(chair)})\n"
    "print('value', result.value)",
    "again = run(council, 'And now?', context='abcdef', models={'chair': FunctionModel(chair)})\n"
    "print('again', again.value)",
    "from council.session import children\n"
    "import time\n"
    "deadline = time.monotonic() + 10\n"
    "while children() and time.monotonic() < deadline:\n"
    "    time.sleep(0.1)\n"
    "print('children', sorted(children()))",
]


def _venv_kernel(root: Path) -> Path:
    """A kernelspec named `venv` that starts this interpreter (JUPYTER_PATH points here)."""
    spec = root / "kernels" / "venv"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "venv", "language": "python"})
    )
    return root


def _outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def test_run_inside_a_notebook_returns_the_result(clean_env, tmp_path, monkeypatch):
    for k, v in clean_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("COUNCIL_LOG_LEVEL", "error")
    monkeypatch.setenv("JUPYTER_PATH", str(_venv_kernel(tmp_path / "jupyter")))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    client = NotebookClient(
        nb,
        timeout=180,
        kernel_name="venv",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    assert f"python {sys.executable}" in _outputs(nb.cells[0])  # the venv's kernel
    assert "value 4" in _outputs(nb.cells[1])
    assert "again 6" in _outputs(nb.cells[2])
    assert "children []" in _outputs(nb.cells[3])
