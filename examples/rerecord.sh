#!/usr/bin/env bash
# Re-record the bundled cassettes with the current code, offline (SmolLM2: the `local` extra).
# Run from the repository root: bash examples/rerecord.sh   (a few minutes on 2 cores)
# Then: python -m pytest tests/test_examples.py   (strict replays of each example)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
C=examples/cassettes
export LITELLM_LOCAL_MODEL_COST_MAP=True
for ex in needle review conversation distributed; do
    rm -rf "$C/$ex.jsonl" "$C/$ex.blobs"
done
"$PY" examples/needle.py --tokens 20000 --record "$C/needle.jsonl" --quiet
"$PY" examples/review.py --scripted-human --record "$C/review.jsonl" --quiet
"$PY" examples/conversation.py --record "$C/conversation.jsonl" --quiet
"$PY" examples/distributed.py --tokens 20000 --record "$C/distributed.jsonl" --quiet
ls -la "$C"
