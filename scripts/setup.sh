#!/usr/bin/env bash
# Idempotent set-up: the CPU build of PyTorch where no torch is installed, then myllm with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # A bare `torch` requirement would pull a multi-GB CUDA build: take the CPU wheel first.
    "$PY" -m pip install -q torch==2.13.0 || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
if ! "$PY" -c "import myllm, deepspeed, peft, tokenizers, pytest, hypothesis" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$("$PY" -c 'import myllm,os;print(os.path.dirname(myllm.__file__))' 2>/dev/null || echo /nonexistent)" ]; then
    "$PY" -m pip install -q -e ".[train,dev]"
fi
