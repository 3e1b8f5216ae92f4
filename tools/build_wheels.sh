#!/usr/bin/env bash
# Build the wheel folder tools/gpu_smoke.sh installs from, on a machine with network:
#
#   tools/build_wheels.sh DIR [PYTHON]
#
# DIR gets megatron_bdlora's own wheel and one wheel per dependency at the versions installed in
# PYTHON's environment (default: this checkout's .venv), downloaded for the GPU machine's target
# (TARGET_PYTHON, default 3.12; TARGET_PLATFORM, default manylinux2014_x86_64: megatron-core has
# a compiled module), binary wheels only. Left out: torch and its own dependencies (sympy,
# networkx, jinja2, fsspec, numpy, ...: the GPU machine's CUDA torch brings its own; installing
# ours over them could break it). DIR/target.txt records python / ABI / platform for the check
# gpu_smoke.sh makes first. At most 64 MiB can travel to a GPU machine: the total is printed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: tools/build_wheels.sh DIR [PYTHON]}"
py="${2:-$root/.venv/bin/python}"
target_py="${TARGET_PYTHON:-3.12}"
platform="${TARGET_PLATFORM:-manylinux2014_x86_64}"
abi="cp${target_py/./}"
mkdir -p "$out"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
# torch's own requirements as the installed torch declares them (names only), and theirs / the CUDA
# build's (numpy, markupsafe, mpmath, triton, nvidia-*)
torch_deps="$("$py" -c 'import importlib.metadata as m, re
print("|".join(re.split(r"[ ;<>=!~\[]", r)[0].lower().replace("_", "-")
               for r in m.requires("torch") or []))')"
"$py" -m pip freeze --all --exclude-editable \
  | grep -viE "^(pip|setuptools|wheel|torch|triton|nvidia-[a-z0-9_-]+|numpy|markupsafe|mpmath|megatron-bdlora|${torch_deps})(==| @)" \
  | sed 's/+cpu$//' > "$reqs"
"$py" -m pip download --no-deps --only-binary=:all: --python-version "$target_py" \
  --implementation cp --abi "$abi" --abi none --abi abi3 --platform "$platform" \
  --platform any -r "$reqs" -d "$out"
"$py" -m pip wheel --no-deps --no-build-isolation "$root" -w "$out"
printf 'python=%s\nabi=%s\nplatform=%s\n' "$target_py" "$abi" "$platform" > "$out/target.txt"
echo "$(ls "$out"/*.whl | wc -l) wheels, $(du -sm "$out" | cut -f1) MiB in $out (limit 64);" \
  "then, on the GPU machine: WHEELS=$out tools/gpu_smoke.sh OUTDIR"
