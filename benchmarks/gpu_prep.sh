#!/usr/bin/env bash
# GPU machine: install the wheels a device call carried into /tmp/site, and write /tmp/site.env to source.
# FlashAttention-4 comes in two pieces over two calls (../shared/tools/fa4-wheels): the first call copies .fa4a/
# to /tmp/fa4, the second carries .fa4b/ and runs this script, which joins the pieces. Wheel folders carried as
# .whl/, .whl-lite/ (gpu-wheels without wandb) or .whl-av/ (PyAV) are installed as found; a later call can add more.
#   bash benchmarks/gpu_prep.sh && . /tmp/site.env
set -euo pipefail
mkdir -p /tmp/site
wheels=()
if [ -f /tmp/fa4/cu13part.aa ] && [ -f .fa4b/cu13part.ab ]; then
  cat /tmp/fa4/cu13part.aa .fa4b/cu13part.ab > /tmp/fa4/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  rm /tmp/fa4/cu13part.aa
fi
if [ -d /tmp/fa4 ] && [ ! -f /tmp/site/.fa4-installed ]; then
  wheels+=(/tmp/fa4/*.whl); touch /tmp/site/.fa4-installed
fi
for d in .whl .whl-lite .whl-av; do
  [ -d "$d" ] && compgen -G "$d/*.whl" >/dev/null && wheels+=("$d"/*.whl)
done
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    >/tmp/site-install.log 2>&1 || { tail -5 /tmp/site-install.log; echo "error: wheel install failed" >&2; exit 1; }
fi
cat > /tmp/site.env <<ENV
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ENV
echo "installed ${#wheels[@]} wheels into /tmp/site"
