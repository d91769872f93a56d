#!/usr/bin/env bash
# The real-shape scan timings on one GPU (issue 14), in one run of under 8 minutes on an H200.
#
#     bash bench/gpu_check.sh            # from the repository root; output under $OUT (default ./gpu-out)
#
# 1. torch with CUDA: the python3 already there when its torch sees a GPU (the lent H200 machines
#    ship one), else a fresh venv with the CUDA build from the PyTorch index (TORCH_INDEX,
#    default cu124: `pip install torch==2.13.0` from PyPI may be CPU-only). Machines that
#    reach no index need the first case, or wheels in $WHEELS.
# 2. amdet-gate from this checkout: on PYTHONPATH, with its pure-Python needs that may be missing
#    (ftfy, wcwidth, jsonschema...) installed from $WHEELS (default ./.whl) when that folder exists.
#    Prepare it where pip works: `pip download --no-deps -d .whl ftfy wcwidth` (and carry `.whl`).
# 3. `bench/scan_speed.py --shapes real --device cuda` (per-phase seconds, peak GPU memory, the
#    projection), then a whole default CLIP-L-shaped scan in fp32 (`--whole`), each under `timeout`.
# bf16 autocast is not an option of the scan today (the engine runs in the weights' dtype); no bf16
# rows are run, so the issue's bf16 figures stay open.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./gpu-out}"
WHEELS="${WHEELS:-./.whl}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu124}"
mkdir -p "$OUT"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

PY=python3
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    log "python3's torch sees no GPU: a fresh venv with the CUDA build from $TORCH_INDEX"
    python3 -m venv /tmp/gpu-venv && PY=/tmp/gpu-venv/bin/python
    if ! timeout 300 "$PY" -m pip install -q torch --index-url "$TORCH_INDEX"; then
        log "could not install the CUDA build of torch (no index reachable?): install one, or carry wheels; stopping"
        exit 3
    fi
    timeout 200 "$PY" -m pip install -q -e . || log "pip install -e . failed: trying PYTHONPATH alone"
fi
if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-site "$WHEELS"/*.whl \
        && export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import torch, transformers, amdet_gate
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0),
      "transformers", transformers.__version__, "amdet_gate", amdet_gate.__file__)
import amdet_gate.tokenizer  # ftfy
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || { log "the package does not import (a missing wheel? see $OUT/gpu_check.log)"; exit 4; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/gpu_check.log" 2>&1

log "rows: bench/scan_speed.py --shapes real --device cuda"
timeout 300 "$PY" bench/scan_speed.py --shapes real --device cuda --steps 5 --sample 64 \
    --json "$OUT/scan_speed_real.json" 2>&1 | tee "$OUT/scan_speed_real.txt"
log "rows done (exit ${PIPESTATUS[0]})"

log "whole default scan, CLIP-L shape (768x12x77), fp32"
timeout 150 "$PY" bench/scan_speed.py --whole --shape 768x12x77 --device cuda 2>&1 | tee "$OUT/whole_clip_l.txt"
log "whole scan done (exit ${PIPESTATUS[0]})"
