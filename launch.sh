#!/usr/bin/env bash
# One entry for everything: set up, run the quickstart, run the tests, launch a recipe on 1..N GPUs / nodes.
# Bad arguments stop with one `error: ...` line and exit code 2, before anything is installed or launched.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

usage() {
  cat <<'USAGE'
usage: bash launch.sh <command> [options]
  quickstart                 set up (first time) + tiny radial-attention LoRA fine-tune (configs/quickstart.yaml)
  test [pytest args]         set up (first time) + the CPU test suite
  train RECIPE [options] [section.key=value ...]
      --gpus N               processes (GPUs) per node (default 1)
      --zero 2|3             DeepSpeed ZeRO stage (configs/accelerate/deepspeed_zero{2,3}.yaml)
      --nodes N --node-rank R --main-addr HOST [--main-port P]   several nodes: run on every node with its rank
  setup                      only create .venv and install
  help                       this text
USAGE
}

die() {  # one line, exit code 2
  echo "error: $*" >&2
  exit 2
}

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

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# train RECIPE [options] [key=value ...]: check everything, then hand over to accelerate (through train/launcher.py,
# which turns a failed run into the trainer's one error line and exit code instead of a launcher traceback).
train() {
  [ $# -gt 0 ] || die "launch.sh train needs a recipe: bash launch.sh train configs/<recipe>.yaml [options] [key=value ...]"
  local recipe=$1; shift
  case "$recipe" in -*) die "launch.sh train: the recipe comes first, got option $recipe (bash launch.sh train configs/<recipe>.yaml [options])" ;; esac
  [ -f "$recipe" ] || die "recipe $recipe: no such file"
  local gpus=1 zero="" nodes=1 rank=0 addr="" port=29500 rest=() flag value
  while [ $# -gt 0 ]; do
    flag=$1
    case "$flag" in
      --gpus|--zero|--nodes|--node-rank|--main-addr|--main-port)
        [ $# -ge 2 ] && [[ $2 != --* ]] || die "$flag needs a value"
        value=$2; shift 2 ;;
      --*) die "unknown option $flag for launch.sh train (options: --gpus, --zero, --nodes, --node-rank, --main-addr, --main-port; recipe overrides are section.key=value)" ;;
      *=*) rest+=("$flag"); shift; continue ;;
      *) die "unexpected argument '$flag' for launch.sh train: recipe overrides are section.key=value" ;;
    esac
    case "$flag" in
      --gpus) { is_uint "$value" && [ "$value" -ge 1 ]; } || die "--gpus takes a whole number >= 1, got '$value'"; gpus=$((10#$value)) ;;
      --zero) [[ $value == 2 || $value == 3 ]] || die "--zero takes 2 or 3 (DeepSpeed ZeRO stage), got '$value'"; zero=$value ;;
      --nodes) { is_uint "$value" && [ "$value" -ge 1 ]; } || die "--nodes takes a whole number >= 1, got '$value'"; nodes=$((10#$value)) ;;
      --node-rank) is_uint "$value" || die "--node-rank takes a whole number >= 0, got '$value'"; rank=$((10#$value)) ;;
      --main-addr) [ -n "$value" ] || die "--main-addr takes a host name or address, got ''"; addr=$value ;;
      --main-port) { is_uint "$value" && [ "$value" -ge 1 ] && [ "$value" -le 65535 ]; } || die "--main-port takes a port number 1-65535, got '$value'"; port=$((10#$value)) ;;
    esac
  done
  [ "$rank" -lt "$nodes" ] || die "--node-rank $rank must be below --nodes $nodes"
  if [ "$nodes" -gt 1 ] && [ -z "$addr" ]; then die "--main-addr is required with --nodes $nodes (the address of the node with --node-rank 0)"; fi

  local acfg
  if [ -n "$zero" ]; then acfg=configs/accelerate/deepspeed_zero${zero}.yaml
  elif [ "$gpus" -gt 1 ] || [ "$nodes" -gt 1 ]; then acfg=configs/accelerate/multi_gpu.yaml
  else acfg=configs/accelerate/single_gpu.yaml; fi
  local multi=(--num_machines "$nodes" --machine_rank "$rank" --num_processes $((gpus * nodes)))
  if [ "$nodes" -gt 1 ]; then multi+=(--main_process_ip "$addr" --main_process_port "$port")
  elif [ "$gpus" -gt 1 ] || [ -n "$zero" ]; then multi+=(--main_process_port "$port"); fi
  # torchrun sets OMP_NUM_THREADS=1 for several processes per node anyway, with a banner; set it quietly instead
  if [ "$gpus" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then export OMP_NUM_THREADS=1; fi
  setup
  exec "$VENV/bin/python" train/launcher.py --config_file "$acfg" "${multi[@]}" \
    train/finetune.py --config "$recipe" ${rest[@]+"${rest[@]}"}
}

[ $# -gt 0 ] || { usage >&2; exit 2; }
cmd=$1; shift
case "$cmd" in
  setup)
    setup ;;
  quickstart)
    train configs/quickstart.yaml "$@" ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest tests "$@" ;;
  train)
    train "$@" ;;
  help|-h|--help)
    usage ;;
  *)
    echo "error: unknown command '$cmd' (quickstart, test, train, setup, help)" >&2
    usage >&2
    exit 2 ;;
esac
