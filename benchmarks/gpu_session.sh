#!/usr/bin/env bash
# One GPU session on a lent H100/H200: the GPU test tier and the benchmarks, results under $OUT.
# The machine has torch/triton/peft/transformers/accelerate; the rest travels as wheels in .whl/
# (made here by ../shared/tools/gpu-wheels datasets av).
#   bash benchmarks/gpu_session.sh [tests] [train] [svg2] [data] [sp]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
ngpu=$(nvidia-smi -L | wc -l)
[ $# -gt 0 ] || set -- tests train svg2 data
for what in "$@"; do
  case "$what" in
    tests) timeout 300 python3 -m pytest tests -m gpu -q -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$OUT/gpu_tests.log" | tail -4 ;;
    train) timeout 390 python3 benchmarks/train_step.py --quick --budget-s 280 --out "$OUT/train_step.md" 2>&1 | grep -v Warning | tail -12 ;;
    train-full) python3 benchmarks/train_step.py --frames 81,161,321 --impls dense,flex,radial,radial-auto,svg2 --modes base,both --out "$OUT/train_step.md" 2>&1 | grep -v Warning | tail -34 ;;
    svg2) timeout 300 python3 benchmarks/svg2.py --out "$OUT/svg2.md" 2>&1 | tail -14 ;;
    data) timeout 240 python3 benchmarks/data.py --workers 1,4 --dtypes uint8 --out /tmp/databench > "$OUT/data.md" 2>&1; tail -6 "$OUT/data.md" ;;
    quickstart)  # the README's main command on a GPU (wandb is not on the machine: tracking off)
      timeout 240 python3 train/finetune.py --config configs/quickstart.yaml tracking.report_to=none \
        train.output_dir=/tmp/qs model.pretrained=/tmp/qs/tiny-wan data.path=/tmp/qs/data data.cache_dir=/tmp/qs/latents \
        2>&1 | grep -v Warning | tail -12 ;;
    mask)  # radial mask build, warm, on the GPU (target <= 50 ms at 81 x 1560)
      python3 - <<'PY' 2>&1 | tee "$OUT/mask.txt"
import time, torch
from sparse_attn.radial import radial_block_mask, _cached_mask
radial_block_mask(2, 1560, device="cuda"); torch.cuda.synchronize()
for f, t in ((81, 1560), (128, 3600)):
    ts = []
    for i in range(5):
        _cached_mask.cache_clear(); torch.cuda.synchronize(); t0 = time.perf_counter()
        radial_block_mask(f, t, device="cuda"); torch.cuda.synchronize(); ts.append(1e3 * (time.perf_counter() - t0))
    print(f"radial_block_mask({f}, {t}) on {torch.cuda.get_device_name()}: median {sorted(ts)[2]:.1f} ms (uncached, warm process)")
PY
      ;;
    profile) timeout 300 python3 benchmarks/profile_step.py --frames 321 --impl radial 2>&1 | grep -v Warning | tee "$OUT/profile.md" | tail -30 ;;
    vae) timeout 300 python3 benchmarks/vae_encode.py --clips 1 --tiling 2>&1 | tail -2 | tee "$OUT/vae.md" ;;
    sp)
      for p in 2 4; do
        [ "$p" -le "$ngpu" ] || continue
        timeout 300 torchrun --nproc_per_node "$p" benchmarks/train_step.py --frames 321 --impls radial --modes both --steps 2 --sp "$p" --out "$OUT/sp.md" 2>&1 | grep -v Warning | tail -5
      done
      timeout 200 python3 benchmarks/train_step.py --frames 321 --impls radial --modes both --steps 2 --out "$OUT/sp.md" 2>&1 | tail -3 ;;
  esac
done
