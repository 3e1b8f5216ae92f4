#!/usr/bin/env bash
''':'
# Fine-tune Llama with BD-LoRA / LoRA on Megatron-Core. All flags after the launcher's go to the
# trainer (--help lists them). This one file runs three ways:
#   pretrain_scripts/finetune_llama.sh [--nproc-per-node N --nnodes M --node-rank I
#       --master-addr A --master-port P] FLAGS      checks everything once, then starts the ranks
#   torchrun [torchrun flags] pretrain_scripts/finetune_llama.sh FLAGS
#       torchrun runs this file with its own Python: the Python part at the end is one rank
#   torchrun --no-python [torchrun flags] pretrain_scripts/finetune_llama.sh FLAGS
#       bash, as one rank: runs the trainer with the interpreter torchrun runs under
# The bash part is a string to Python (the quotes above); bash never reaches the Python part.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
py=""
if [ -n "${TORCHELASTIC_RUN_ID:-}" ] && [ -r "/proc/$PPID/cmdline" ]; then
  # torchrun --no-python: its own interpreter is the first word of its command line
  py="$(tr '\0' '\n' < "/proc/$PPID/cmdline" | head -n 1)"
  case "$(basename "$py")" in python*) py="$(command -v "$py" || true)" ;; *) py="" ;; esac
fi
if [ -z "$py" ]; then
  if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ]; then py="$VIRTUAL_ENV/bin/python"
  elif [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"
  else py="$(command -v python3 || command -v python)"
  fi
fi
if [ -n "${TORCHELASTIC_RUN_ID:-}" ]; then
  exec "$py" "$here/finetune_llama.py" "$@"
fi
exec "$py" -m megatron_bdlora.launch.cli "$@"
"'''" <<'PYEOF' #"
# Python: torchrun runs this file as one rank, with the interpreter torchrun runs under. (The line
# above ends Python's string; to bash it opens a here-document that hides this part.)
import os
import runpy
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_here))
runpy.run_path(os.path.join(_here, "finetune_llama.py"), run_name="__main__")
raise SystemExit
PYEOF
