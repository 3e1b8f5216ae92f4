#!/usr/bin/env bash
# Build the wheel folder tools/gpu_smoke.sh installs from, on a machine with network:
#
#   tools/build_wheels.sh DIR [PYTHON]
#
# DIR gets megatron_bdlora's own wheel and one wheel per dependency, pinned to the versions
# installed in PYTHON's environment (default: this checkout's .venv), without torch and its CUDA
# libraries (the GPU machine has its own). Use a PYTHON of the same version as the GPU machine's:
# wheels of compiled packages are per Python version.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: tools/build_wheels.sh DIR [PYTHON]}"
py="${2:-$root/.venv/bin/python}"
mkdir -p "$out"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
# the environment's exact pins (setuptools too: torch requires a recent one); not pip, torch,
# nvidia-*, triton (the GPU machine's CUDA build), not this project (editable)
"$py" -m pip freeze --all --exclude-editable \
  | grep -viE '^(pip|torch|triton|nvidia-[a-z0-9_-]+|megatron-bdlora)(==| @)' \
  | sed 's/+cpu$//' > "$reqs"
"$py" -m pip wheel --no-deps -r "$reqs" -w "$out"
"$py" -m pip wheel --no-deps --no-build-isolation "$root" -w "$out"
echo "$(ls "$out"/*.whl | wc -l) wheels in $out; then, on the GPU machine: WHEELS=$out tools/gpu_smoke.sh"
