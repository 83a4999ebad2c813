"""Layering of the package, read from the source (ast; nothing is imported):

- the library (`megatron_rlvr/`) never imports `checkpoint_tools`: the command-line tools are a
  thin layer over the library, never the other way round (the HF export the trainer uses lives in
  `megatron_rlvr/hf_export.py`);
- `megatron_rlvr/data/` sits at the bottom: it imports only itself and leaf utilities
  (`safety`), never `rollout/` nor anything that builds on data (trainer, policy, generation,
  batch, models, algos, ...). Checked on the transitive closure of package-internal imports,
  counting the parent packages' `__init__` that every import runs (importing
  `megatron_rlvr.rollout.base` runs `rollout/__init__.py`, which imports vLLM).

Imports anywhere in a module count, including those inside functions (a lazy import is still a
dependency) and `importlib.import_module("...")` with a constant name.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_rlvr"
# What data/ may reach (module names; a name covers its submodules).
DATA_MAY_IMPORT = (f"{PACKAGE}.data", f"{PACKAGE}.safety")


def module_files(root: Path | None = None, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (packages by their __init__)."""
    root = root or ROOT
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(dotted name, line) of everything `source` imports. For `from X import a`, both `X` and
    `X.a` are listed (`a` may be a submodule); relative imports are resolved against `module`."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            out += [(f"{target}.{alias.name}", node.lineno) for alias in node.names
                    if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name)
                       and node.func.id in ("import_module", "__import__")))):
            out.append((node.args[0].value, node.lineno))
    return out


def _internal(name: str, modules: dict[str, Path]) -> list[str]:
    """The package modules an import of `name` runs: the longest existing module it names and
    every parent package's __init__."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def import_graph(root: Path | None = None, package: str = PACKAGE):
    root = root or ROOT
    modules = module_files(root, package)
    graph: dict[str, dict[str, int]] = {}
    external: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        names = imported_names(path.read_text(), name, path.name == "__init__.py")
        external[name] = names
        edges: dict[str, int] = {}
        for target, line in names:
            if target == package or target.startswith(package + "."):
                for dep in _internal(target, modules):
                    if dep != name:
                        edges.setdefault(dep, line)
        graph[name] = edges
    return modules, graph, external


def _covered(name: str, allowed: tuple[str, ...]) -> bool:
    return name == PACKAGE or any(name == a or name.startswith(a + ".") for a in allowed)


def test_library_never_imports_checkpoint_tools():
    modules, _, imports = import_graph()
    offenders = {}  # one line per import statement
    for m, names in imports.items():
        for name, line in names:
            if name == "checkpoint_tools" or name.startswith("checkpoint_tools."):
                offenders.setdefault((m, line), f"{modules[m].relative_to(ROOT)}:{line}: {name}")
    offenders = list(offenders.values())
    assert not offenders, ("the library must not import checkpoint_tools (the CLI is a layer "
                           "over it):\n" + "\n".join(offenders))


def test_data_imports_nothing_above_it():
    modules, graph, _ = import_graph()
    offenders = []
    for start in (m for m in modules if _covered(m, (f"{PACKAGE}.data",))):
        # Breadth-first over package-internal imports, keeping the path for the message.
        seen, frontier = {start: [start]}, [start]
        while frontier:
            nxt = []
            for m in frontier:
                for dep, line in graph.get(m, {}).items():
                    if dep in seen:
                        continue
                    seen[dep] = seen[m] + [f"{dep} (line {line} of {m})"]
                    if _covered(dep, DATA_MAY_IMPORT):
                        nxt.append(dep)
                    else:
                        offenders.append(" -> ".join(seen[dep]))
            frontier = nxt
    assert not offenders, ("megatron_rlvr/data/ may import only " + ", ".join(DATA_MAY_IMPORT)
                           + ":\n" + "\n".join(offenders))


def test_the_parser_sees_every_form_of_import(tmp_path):
    """The checks above are only as good as the parser: every way of spelling an import counts."""
    pkg = tmp_path / PACKAGE
    (pkg / "data").mkdir(parents=True)
    (pkg / "rollout").mkdir()
    for f in ("__init__.py", "data/__init__.py", "rollout/__init__.py", "rollout/base.py",
              "safety.py", "data/ok.py"):
        (pkg / f).write_text("")
    (pkg / "data" / "ok.py").write_text("import megatron_rlvr.data\n"
                                        "from megatron_rlvr import safety\n")
    (pkg / "data" / "bad.py").write_text(
        "import os\n"
        "def f():\n"
        "    from ..rollout import base\n"
        "    from checkpoint_tools.convert import write_hf\n"
        "    import importlib\n"
        "    importlib.import_module('megatron_rlvr.trainer')\n")
    modules, graph, imports = import_graph(tmp_path, PACKAGE)
    assert f"{PACKAGE}.rollout.base" in graph[f"{PACKAGE}.data.bad"]
    assert f"{PACKAGE}.rollout" in graph[f"{PACKAGE}.data.bad"]  # its __init__ runs too
    names = [n for n, _ in imports[f"{PACKAGE}.data.bad"]]
    assert "checkpoint_tools.convert" in names and f"{PACKAGE}.trainer" in names
    assert set(graph[f"{PACKAGE}.data.ok"]) <= {PACKAGE, f"{PACKAGE}.data", f"{PACKAGE}.safety"}
