"""The package's import structure, counted from the source (nothing is imported or run):

    python tools/import_layers.py          # counts, the package-level cycles, the lazy imports
    python tools/import_layers.py --check  # exit 1 unless no cycle and at most MAX_LAZY lazy
                                           # imports of our own modules, each with a comment

Counts every `import` / `from ... import` statement under megatron_bdlora/: all of them, those
inside a function (function-local), and those of the package's own modules. A package-level
cycle is a loop of subpackages (adapters, models, ...) importing each other, function-local
imports included. docs/design.md §0 gives the layer order they follow.
"""

import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "megatron_bdlora"
MAX_LAZY = 10  # function-local imports of our own modules (each says why it is lazy)


def _module(path: str) -> str:
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node, module: str, is_package: bool) -> list:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not node.level:
        return [node.module]
    base = module.split(".")[:len(module.split(".")) - node.level + is_package]
    return [".".join(base + ([node.module] if node.module else []))]


def measure(root: str = ROOT) -> dict:
    """{"imports", "local", "lazy": [(file, line, module)], "edges": {subpackage: set}}"""
    out = {"imports": 0, "local": 0, "lazy": [], "uncommented": [], "edges": {}}
    for folder, _, files in sorted(os.walk(os.path.join(root, PACKAGE))):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                text = f.read()
            lines, module = text.splitlines(), _module(path)
            rel = os.path.relpath(path, root)

            def visit(node, local):
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.Import, ast.ImportFrom)):
                        out["imports"] += 1
                        out["local"] += local
                        own = [t for t in _targets(child, module, name == "__init__.py")
                               if t.split(".")[0] == PACKAGE]
                        for target in own:
                            a, b = module.split(".")[1:2], target.split(".")[1:2]
                            if a and b and a != b:
                                out["edges"].setdefault(a[0], set()).add(b[0])
                        if local and own:
                            out["lazy"].append((rel, child.lineno, own[0]))
                            near = lines[child.lineno - 2:child.end_lineno]
                            if not any("#" in line for line in near):
                                out["uncommented"].append((rel, child.lineno, own[0]))
                    visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

            visit(ast.parse(text), False)
    return out


def cycles(edges: dict) -> list:
    """The strongly connected components of more than one subpackage (Tarjan)."""
    index, low, stack, found, counter = {}, {}, [], [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            connect(v)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    m = measure()
    loops = cycles(m["edges"])
    print(f"imports: {m['imports']}; function-local: {m['local']}; function-local of "
          f"{PACKAGE}'s own modules: {len(m['lazy'])}")
    print(f"package-level cycles (function-local imports included): {loops or 'none'}")
    for rel, line, target in m["lazy"]:
        print(f"  lazy: {rel}:{line} {target}")
    problems = ([f"cycle {' <-> '.join(c)}" for c in loops]
                + ([f"{len(m['lazy'])} lazy imports of our own modules, more than {MAX_LAZY}"]
                   if len(m["lazy"]) > MAX_LAZY else [])
                + [f"{rel}:{line}: lazy import of {target} without a comment saying why"
                   for rel, line, target in m["uncommented"]])
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
