#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DeepSpeed JIT-builds a small comm extension; a fresh folder per run means a killed build's stale
# lock can never hang a later run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(mktemp -d -t myllm-torch-ext-XXXXXX)}"
exec "${PYTHON:-python3}" -m pytest -q "$@"
