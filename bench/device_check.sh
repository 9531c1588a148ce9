#!/usr/bin/env bash
# The prepared accelerator check (bench/device_check.py): SD1 UNet bf16 training step (ms/step, TFLOP/s, MFU),
# SD1 512² 50-step DPM++ 2M sampling at batch 1 and 8, the attention path. ≤ 8 minutes on one H200.
#   bash bench/device_check.sh           # full size, on the accelerator
#   bash bench/device_check.sh --cpu     # smoke size on a CPU
#   bash bench/device_check.sh --model sdxl   # SDXL base 1024² (UNTESTED on an accelerator; its --cpu smoke size ran)
# The device image has jax + flax + optax + orbax + transformers + safetensors only. Pure-Python packages the
# check needs beyond those (ml-collections, absl-py, tqdm) are installed from wheels in $WHEELS (default: wheels/,
# made here with `pip download --no-deps -d wheels ml-collections absl-py tqdm` and carried with the run).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
for mod in ml_collections absl tqdm; do
  if ! python3 -c "import $mod" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
      python3 -m pip install -q --no-index --no-deps --find-links "$WHEELS" "${mod/_/-}" 2>/dev/null \
        || python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
    else
      echo "device_check: python module $mod is missing and there is no $WHEELS/ folder of wheels" >&2
    fi
  fi
done
if [ "${1:-}" = "--cpu" ]; then export JAX_PLATFORMS=cpu; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout "${DEVICE_CHECK_TIMEOUT:-480}" python3 bench/device_check.py "$@"
