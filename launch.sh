#!/usr/bin/env bash
# One entry for everything: set up, run the quickstart, run the tests, launch a recipe on 1..N GPUs / nodes.
#
#   bash launch.sh quickstart                     # set up (first time) + tiny radial-attention LoRA fine-tune
#   bash launch.sh test                           # set up (first time) + the CPU test suite
#   bash launch.sh train configs/<recipe>.yaml [--gpus N] [--zero 2|3] [--nodes N --node-rank R --main-addr HOST [--main-port P]] [key=value ...]
#   bash launch.sh setup                          # only create .venv and install
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

setup() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sparse_attn, train, data, torch, diffusers, deepspeed" 2>/dev/null; then
    return
  fi
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "torch>=2.5,<2.15"
  else
    "$VENV/bin/python" -m pip install -q torch==2.13.0   # the CPU build (a bare `torch` pulls a multi-GB CUDA build)
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup)
    setup ;;
  quickstart)
    setup
    exec "$VENV/bin/accelerate" launch --num_processes 1 --num_machines 1 --dynamo_backend no \
      --mixed_precision "$(command -v nvidia-smi >/dev/null 2>&1 && echo bf16 || echo no)" \
      train/finetune.py --config configs/quickstart.yaml "$@" ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest tests "$@" ;;
  train)
    setup
    recipe=${1:?usage: launch.sh train configs/<recipe>.yaml [options] [key=value ...]}; shift
    gpus=1; zero=""; nodes=1; rank=0; addr=""; port=29500; rest=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --gpus) gpus=$2; shift 2 ;;
        --zero) zero=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --node-rank) rank=$2; shift 2 ;;
        --main-addr) addr=$2; shift 2 ;;
        --main-port) port=$2; shift 2 ;;
        *) rest+=("$1"); shift ;;
      esac
    done
    if [ -n "$zero" ]; then acfg=configs/accelerate/deepspeed_zero${zero}.yaml
    elif [ "$gpus" -gt 1 ] || [ "$nodes" -gt 1 ]; then acfg=configs/accelerate/multi_gpu.yaml
    else acfg=configs/accelerate/single_gpu.yaml; fi
    [ -f "$acfg" ] || { echo "error: no accelerate config $acfg (--zero takes 2 or 3)" >&2; exit 2; }
    multi=(--num_machines "$nodes" --machine_rank "$rank" --num_processes $((gpus * nodes)))
    if [ "$nodes" -gt 1 ]; then
      [ -n "$addr" ] || { echo "error: --main-addr is required with --nodes > 1" >&2; exit 2; }
      multi+=(--main_process_ip "$addr" --main_process_port "$port")
    fi
    exec "$VENV/bin/accelerate" launch --config_file "$acfg" "${multi[@]}" train/finetune.py --config "$recipe" "${rest[@]}" ;;
  *)
    sed -n '2,9p' "$0"; exit 2 ;;
esac
