#!/usr/bin/env bash
# Set up (if needed) and run the main job: `myllm demo` on bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(mktemp -d -t myllm-torch-ext-XXXXXX)}"
exec "${PYTHON:-python3}" -m myllm demo "$@"
