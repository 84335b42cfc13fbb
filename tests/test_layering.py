"""The dependency direction, derived from the folders, over every module of the package.

Layers, bottom up (a module may import only its own layer and those below it):

    kernels, protos, decoding  ->  towers  ->  cluster.engine -> cluster.actors -> cluster.ingress
                                                              -> cluster.serve -> cluster.cli

`twotower/cluster/__init__.py` and `twotower/cluster/app.py` (the public API and the old Serve import path) sit on top.
The engine core imports no Ray, gRPC or FastAPI. Imports are read from the source (ast), those inside
functions included, so an import cycle shows even where it only works because an import is deferred;
and a new file or sub-package is checked without editing this test.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "twotower"  # the package folder
# sub-package -> its folder under twotower/
PACKAGES = {"kernels": "kernels", "protos": "protos", "decoding": "decoding", "towers": "towers",
            "cluster": "cluster"}  # fmt: skip
# rank of each layer: a module may import modules of equal or lower rank. Unlisted cluster
# sub-packages fail the test (a new layer needs a place here).
RANKS = {"kernels": 0, "protos": 0, "decoding": 0, "towers": 1, "cluster.engine": 2, "cluster.actors": 3,
         "cluster.ingress": 4, "cluster.serve": 5, "cluster.cli": 6, "cluster": 7}  # fmt: skip
FORBIDDEN = {  # layer -> third-party roots it must never import
    "kernels": {"ray", "grpc", "fastapi", "starlette", "google"},
    "decoding": {"ray", "grpc", "fastapi", "starlette", "google"},
    "towers": {"ray", "grpc", "fastapi", "starlette", "google"},
    "cluster.engine": {"ray", "grpc", "fastapi", "starlette", "google", "grpc_health", "grpc_reflection"},
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """twotower.* module name -> file, for every .py of the package (generated protobuf code included)."""
    out = {}
    for top, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(["twotower", top, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The twotower modules `name` imports anywhere in its source (resolved to known modules)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def add(target: str, names: list[str]) -> None:
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
        if subs:  # `from pkg import submodule`
            found.update(subs)
        if len(subs) < len(names):
            while target and target not in known:  # `import a.b.c` loads a.b.c; attribute imports load the module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("twotower."):
                    add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("twotower."):
                add(target, [a.name for a in node.names])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module", "__import__"):  # fmt: skip
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("twotower."):
                add(str(node.args[0].value), [])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("twotower."):
            # a lazy import table ({"Engine": "twotower.cluster.engine.engine"}) imports its modules too
            if node.value in known:
                found.add(node.value)
    found.discard(name)
    return found


def third_party_of(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def layer_of(name: str) -> str:
    parts = name.split(".")[1:]  # drop "twotower"
    if parts[0] != "cluster":
        return parts[0]
    if len(parts) == 1 or parts[1] not in {p.name for p in (ROOT / "cluster").iterdir() if p.is_dir()}:
        return "cluster"  # twotower/cluster/__init__.py and modules at the cluster root
    return f"cluster.{parts[1]}"


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        layer = layer_of(mod)
        if layer not in RANKS:
            bad.append(f"{mod}: layer {layer!r} has no rank in tests/test_layering.py")
            continue
        for dep in deps:
            if RANKS[layer_of(dep)] > RANKS[layer]:
                bad.append(f"{mod} ({layer}) imports {dep} ({layer_of(dep)})")
            elif layer_of(dep) != layer and RANKS[layer_of(dep)] == RANKS[layer] and layer != "cluster":
                bad.append(f"{mod} ({layer}) imports {dep} from a sibling layer ({layer_of(dep)})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_ranked_layer_and_imports_only_downwards():
    g = graph()
    assert len(g) > 60, "the walk found too few modules"
    assert not upward_imports(g), "\n".join(upward_imports(g))


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_forbidden_third_party_imports():
    bad = []
    for name, path in module_files().items():
        rules = FORBIDDEN.get(layer_of(name), set())
        hit = third_party_of(path) & rules
        if hit:
            bad.append(f"{name} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_checker_catches_a_planted_cycle_and_an_upward_import(tmp_path):
    """The checks above are only as good as the parser: plant both faults in a copy and see them fail."""
    import shutil

    for folder in PACKAGES.values():
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # an upward import: the engine reaching for the Serve layer (inside a function, as a cycle would hide)
    runners = tmp_path / "cluster" / "engine" / "runners.py"
    runners.write_text(runners.read_text() + "\n\ndef _planted():\n    from twotower.cluster.serve import deploy\n")
    # a cycle inside one layer: scheduler -> engine -> scheduler
    sched = tmp_path / "cluster" / "engine" / "scheduler.py"
    sched.write_text(sched.read_text() + "\n\ndef _planted():\n    from .engine import Engine\n")
    g = graph(tmp_path)
    assert any("cluster.engine.runners" in b and "cluster.serve.deploy" in b for b in upward_imports(g))
    assert ["twotower.cluster.engine.engine", "twotower.cluster.engine.scheduler"] in cycles(g)


def _loaded_after(imports: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in imports) + "print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("modules,banned", [
    # the engine core and the public API load no Ray, gRPC, protobuf or web framework
    (["twotower.cluster.engine." + p.stem for p in (ROOT / "cluster" / "engine").glob("*.py")]
     + ["twotower.cluster"], ("ray", "grpc", "google", "fastapi")),
    # the deploy config and the CLI's entry module: editing a dict starts no Ray, Serve, gRPC or torch
    (["twotower.cluster.serve.deploy", "twotower.cluster.serve.config", "twotower.cluster.cli.main"],
     ("ray", "grpc", "fastapi", "torch")),
])  # fmt: skip
def test_what_importing_loads(modules, banned):
    """At run time too (this sees imports that the source check above cannot, such as a package's
    __init__ pulling in more than its layer)."""
    mods = _loaded_after(modules)
    bad = sorted(m for m in mods if m.split(".")[0] in banned)
    assert not bad, f"importing {modules} loaded {bad[:10]}"
