#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one go, on a machine with its own PyTorch and no package index:
# extraction against a bare ViT-B-16 forward (both decoders), then full MTIL Order I for one epoch through
# every stage to the report. Run from the checkout, with the wheels of `python scripts/wheelhouse.py` in
# .whl/ (or $WHEELS); each run's output is also written to $OUT (default: out/gpu).
#
#     bash benchmarks/gpu_runs.sh            # MTIL_LIMIT_S=480 by default: the MTIL run's own time limit
set -euo pipefail
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moder-site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/moder-site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchcodec; print('torch', torch.__version__, 'torchcodec', torchcodec.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/extract_throughput.py --device cuda --images 8192 --workers 4 8 15 2>&1 | tee "$OUT/extract.txt"
timeout "${MTIL_LIMIT_S:-480}" python3 benchmarks/mtil_scale.py --sequence mtil-order1 --epochs 1 --device cuda 2>&1 |
    tee "$OUT/mtil-order1.txt"
