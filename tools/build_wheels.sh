#!/usr/bin/env bash
# Build the wheel folder tools/gpu_smoke.sh installs from, on a machine with network:
#
#   tools/build_wheels.sh DIR [PYTHON]
#   TARGET_HAS=tools/gpu_image.txt tools/build_wheels.sh wheels/gpu      # the GPU machine (default target)
#   TARGET_PYTHON=3.11 tools/build_wheels.sh wheels/cpu                  # this machine, a fresh venv
#
# DIR gets megatron_bdlora's own wheel and one binary wheel per package of its dependency closure
# (install_requires, no extras, markers evaluated for the target), at the versions installed in
# PYTHON's environment (default: this checkout's .venv), downloaded for the target: TARGET_PYTHON
# (default 3.12), x86_64 manylinux (megatron-core has a compiled module). Left out: torch and its
# own dependency closure (sympy, networkx, jinja2, fsspec, ...: the target's torch brings its
# own; ours over them could break a CUDA torch), and the packages named in TARGET_HAS (a file,
# one name a line: what the target image already has; the install keeps a satisfied one).
# DIR/target.txt records python / ABI / arch for the check gpu_smoke.sh makes first. At most
# 64 MiB travel to a GPU machine with the working tree: the total is printed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: tools/build_wheels.sh DIR [PYTHON]}"
py="${2:-$root/.venv/bin/python}"
target_py="${TARGET_PYTHON:-3.12}"
abi="cp${target_py/./}"
mkdir -p "$out"
rm -f "$out"/*.whl "$out/target.txt"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$py" -m pip wheel -q --no-deps --no-build-isolation "$root" -w "$out"
"$py" - "$target_py" "${TARGET_HAS:-}" "$out"/megatron_bdlora-*.whl > "$reqs" <<'PYEOF'
import email, importlib.metadata as md, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

target, has_file, ours = sys.argv[1:]
env = {"python_version": target, "python_full_version": target + ".0", "sys_platform": "linux",
       "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix"}

def closure(requires, skip=frozenset()):
    """{canonical name: installed version} of the requirements `requires`, recursively."""
    seen, todo = {}, [(requires, ())]
    while todo:
        lines, extras = todo.pop()
        for line in lines:
            r = Requirement(line)
            if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                continue
            n = canon(r.name)
            if n in skip or (n in seen and not r.extras):
                continue
            seen[n] = md.version(r.name)
            todo.append((md.requires(r.name) or [], tuple(r.extras)))
    return seen

has = {canon(l.split("#")[0].strip()) for l in open(has_file) if l.split("#")[0].strip()} if has_file else set()
with zipfile.ZipFile(ours) as z:  # the requirements of the wheel just built, not of a stale install
    meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
torch_side = {"torch", *closure(md.requires("torch") or [])}
for n, v in sorted(closure(meta.get_all("Requires-Dist") or [], skip=torch_side | has).items()):
    print(f"{n}=={v.removesuffix('+cpu')}")
PYEOF
# pip matches manylinux tags exactly: name every glibc level a wheel may carry (2.17 ... 2.39)
platforms=(--platform any --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$target_py" \
  --implementation cp --abi "$abi" --abi none --abi abi3 "${platforms[@]}" -r "$reqs" -d "$out"
printf 'python=%s\nabi=%s\narch=x86_64\n' "$target_py" "$abi" > "$out/target.txt"
echo "$(ls "$out"/*.whl | wc -l) wheels, $(du -sm "$out" | cut -f1) MiB in $out" \
  "(with the working tree at most 64 MiB travel to a GPU machine);" \
  "install: pip install --no-index --find-links $out megatron-bdlora"
