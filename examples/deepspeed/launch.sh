#!/usr/bin/env bash
# Multi-process pretraining with DeepSpeed ZeRO: run.yaml + ds_config.json, launched by torchrun or by
# DeepSpeed's own launcher; one process per GPU (on a machine without GPUs: 2 CPU processes over gloo).
#
#   bash examples/deepspeed/launch.sh                                # torchrun, ZeRO-2
#   bash examples/deepspeed/launch.sh --set engine.zero_stage=3      # ZeRO-3 (more options go to `myllm train`)
#   LAUNCHER=deepspeed bash examples/deepspeed/launch.sh             # DeepSpeed's launcher instead of torchrun
#   NPROC=4 OUT=runs/ds bash examples/deepspeed/launch.sh            # 4 processes, another output folder
#   bash examples/deepspeed/launch.sh --quick                        # tiny model, 3 steps (what the test runs)
#
# Several nodes: run the same torchrun line on each with --nnodes N --node_rank I --master_addr HOST
# (or pass DeepSpeed's launcher a --hostfile); nothing in run.yaml changes.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
OUT="${OUT:-runs/examples/deepspeed}"
QUICK=()
if [[ "${1:-}" == "--quick" ]]; then
  QUICK=(--quick)
  shift
fi
NPROC="${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')}"

# data and tokenizer (once, before the ranks start); prints the --set options that point run.yaml at them
mapfile -t SETS < <("$PY" "$HERE/prepare.py" --out "$OUT" "${QUICK[@]}")
ARGS=(train "$HERE/run.yaml" "${SETS[@]}" "$@")

case "${LAUNCHER:-torchrun}" in
  torchrun)
    # --standalone: a one-node rendezvous on a free port
    set -x
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m myllm "${ARGS[@]}"
    ;;
  deepspeed)
    # --no_local_rank: myllm reads the rank from the environment, not from a --local_rank argument
    set -x
    deepspeed --num_gpus "$NPROC" --no_local_rank --module myllm "${ARGS[@]}"
    ;;
  *)
    echo "LAUNCHER must be torchrun or deepspeed, got ${LAUNCHER}" >&2
    exit 2
    ;;
esac
