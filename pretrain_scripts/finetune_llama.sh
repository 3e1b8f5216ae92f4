#!/usr/bin/env bash
# Launch BD-LoRA / LoRA fine-tuning with torchrun. All flags go to the trainer (--help lists them).
#   NPROC=4 pretrain_scripts/finetune_llama.sh --tensor-model-parallel-size 2 --hf-checkpoint DIR ...
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (env) or --nproc-per-node/--nnodes/
# --node-rank/--master-addr/--master-port (first, before the trainer flags).
# Under `torchrun --no-python pretrain_scripts/finetune_llama.sh ...` this already is one rank:
# it runs the trainer directly.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if [ -x "$here/../.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then PYTHON="$here/../.venv/bin/python"; fi

if [ -n "${TORCHELASTIC_RUN_ID:-}" ] || { [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; }; then
  exec "$PYTHON" "$here/finetune_llama.py" "$@"
fi

NPROC="${NPROC:-1}"; NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --master-addr) MASTER_ADDR="$2"; shift 2 ;;
    --master-port) MASTER_PORT="$2"; shift 2 ;;
    *) break ;;
  esac
done
# Check the flags once, in one process, before starting the ranks: a bad flag / file / batch
# size is then a single one-line error (status 2), not one per rank plus torchrun's traceback.
case " $* " in *" -h "*|*" --help "*) exec "$PYTHON" "$here/finetune_llama.py" "$@" ;; esac
WORLD_SIZE=$((NPROC * NNODES)) RANK=0 "$PYTHON" -c \
  'import sys; from megatron_bdlora.training.arguments import parse_args; parse_args(sys.argv[1:])' "$@"
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --nnodes "$NNODES" \
  --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  "$here/finetune_llama.py" "$@"
