#!/usr/bin/env bash
# GPU check on one GPU node (benchmarks/gpu_check.py measures; this wrapper checks the node first):
#
#   benchmarks/gpu_check.sh                    # from the repository root, on a GPU node; < 8 min on one GPU
#   srun -p dc-gpu -A $CYTONET_SLURM_ACCOUNT --gres=gpu:1 -t 15 benchmarks/gpu_check.sh   # on JURECA-DC
#
# Writes benchmarks/out/gpu_check/gpu_check.json and gpu_check.md (--out DIR elsewhere); other options go to
# gpu_check.py (--section-px N, --device cuda:1). It uses the first visible GPU: set CUDA_VISIBLE_DEVICES to pick
# another. Environment: PYTHON (default .venv/bin/python, else python3), CYTONET_GPU_PEAK_TFLOPS (the GPU's dense
# bf16 peak when gpu_check.py's table does not know the device), GPU_CHECK_TIMEOUT_S (default 470).
set -euo pipefail

cd "$(dirname "$0")/.."
log() { echo "gpu_check.sh: $*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
    log "nvidia-smi not found: this is not a GPU node (for the CPU smoke check: python benchmarks/gpu_check.py --smoke)"
    exit 2
fi
if ! gpus=$(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1) \
        || [[ -z $gpus ]]; then
    log "nvidia-smi sees no GPU: $gpus"
    exit 2
fi
log "GPUs on $(hostname):"
echo "$gpus" | sed 's/^/    /' >&2

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "$PY: torch does not see a CUDA device (a CPU-only torch build, or CUDA_VISIBLE_DEVICES hides the GPU):"
    "$PY" -c 'import torch; print("    torch", torch.__version__, "CUDA", torch.version.cuda)' >&2 || true
    exit 3
fi

timeout_s=${GPU_CHECK_TIMEOUT_S:-470}
log "running $PY benchmarks/gpu_check.py $* (stopped after ${timeout_s} s)"
status=0
timeout --signal=TERM --kill-after=20 "$timeout_s" "$PY" benchmarks/gpu_check.py "$@" || status=$?
if [[ $status == 124 || $status == 137 ]]; then
    log "gpu_check.py ran past ${timeout_s} s and was stopped; nothing was written (try --section-px 8192)"
elif [[ $status == 0 ]]; then
    log "done: see benchmarks/out/gpu_check/gpu_check.md (or the --out folder)"
fi
exit "$status"
