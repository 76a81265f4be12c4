#!/usr/bin/env bash
# GPU machine wrapper for benchmarks/e2e_recipes.py: installs the wheels from .whl/ (the machine's Python has torch,
# accelerate, peft, transformers; diffusers, deepspeed, datasets, av travel as wheels), gives launch.sh a venv that
# sees them, then runs the rows. The work folder runs/e2e persists while the machine stays warm, so a long row can
# be run one phase per call:
#   bash benchmarks/e2e_recipes.sh wan13b-321f-1gpu                 # all phases of one row
#   bash benchmarks/e2e_recipes.sh wan14b-720p-161f-z3-2gpu build   # build, train, resume, export (comma-separated)
# The table row is appended to $OUT/e2e.md (and runs/e2e/e2e.md) after the export phase.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rows=${1:?usage: bash benchmarks/e2e_recipes.sh ROW[,ROW...] [all|build,train,resume,export]}
phase=${2:-all}
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
    || { echo "error: wheel install from .whl/ failed" >&2; exit 1; }
fi
# launch.sh runs "$VENV/bin/python" and "$VENV/bin/accelerate": point it at the machine's own environment
# (a venv made from it would not see its packages when python3 is itself a venv's)
export VENV=$(python3 -c 'import sys; print(sys.prefix)') PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
mkdir -p runs/e2e
python3 benchmarks/e2e_recipes.py --rows "$rows" --phase "$phase" --out runs/e2e/e2e.md 2>&1 \
  | grep -v -e Warning -e "warnings.warn" | tee "$OUT/e2e_${rows//,/_}_${phase}.log" | tail -40
rc=${PIPESTATUS[0]}
[ -f runs/e2e/e2e.md ] && cp runs/e2e/e2e.md "$OUT/e2e.md"
exit "$rc"
