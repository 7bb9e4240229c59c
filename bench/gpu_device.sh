#!/usr/bin/env bash
# Issue 18's GPU figures in one go, on a CUDA machine: `bash bench/gpu_device.sh [--quick]` from the
# repository root. It needs no network (random weights), only a Python with torch (CUDA), transformers,
# numpy, opencv, pillow, simplejpeg, pillow-heif, pydantic, PyYAML, redis and rq: the project's
# `pip install -e '.[torch]'`. A few minutes with --quick (no max-autotune compile); allow ~15 without.
# The whole output goes to stdout and to bench/gpu-<date>.log, for bench/RESULTS.md section 7.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
LOG="bench/gpu-$(date -u +%Y%m%dT%H%M%SZ).log"

"$PY" - <<'PYEOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "cv2", "PIL", "simplejpeg", "pillow_heif", "pydantic", "yaml", "redis", "rq")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (pip install -e '.[torch]')")
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: every row would print as skipped")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
# One GPU: the forward rows and the whole-job rows compare like with like.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
"$PY" -m bench gpu "$@" 2>&1 | tee "$LOG"
echo "written: $LOG"
