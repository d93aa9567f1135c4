"""The house's layout: the import graph runs one way (cli -> psfcvae -> psfgen -> psfgen.shared) without circles,
imports sit at the top of modules, and one module opens the grid file."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from helpers import ROOT


def imported_modules(path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]) if path.is_relative_to(ROOT) else ""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}  # from . import x: x may be a module
    return names


@pytest.mark.parametrize(
    "layer, forbidden",
    [("psfcvae", ("cli",)), ("psfgen", ("cli", "psfcvae")), ("psfgen/shared", ("cli", "psfcvae", "psfgen."))],
)
def test_no_layer_imports_a_layer_above_it(layer, forbidden):
    for path in sorted((ROOT / layer).rglob("*.py")):
        for name in imported_modules(path):
            if layer == "psfgen/shared" and name.startswith("psfgen.shared"):
                continue
            assert not any(name == f or name.startswith(f if f.endswith(".") else f + ".") for f in forbidden), (
                f"{path.relative_to(ROOT)} imports {name}"
            )


def test_the_scan_sees_imports():  # the oracle itself
    names = imported_modules(ROOT / "psfgen" / "shared" / "devices.py")
    assert "psfgen.shared.errors" in names and "torch" in names
    names = imported_modules(ROOT / "psfcvae" / "training" / "loop.py")
    assert "psfgen.shared.configio" in names or "psfgen.shared" in names


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_benchmark_imports(path):
    """A module the benchmarks import from can move (bench_generate once lost resolve_device that way):
    load each script as a module, which runs its imports but not its main()."""
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _modules() -> dict[str, Path]:
    """Every module of psfgen, psfcvae and the CLI: dotted name -> file."""
    out = {"cli": ROOT / "cli.py"}
    for package in ("psfgen", "psfcvae"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project's modules it imports (a name imported from a package counts as that package's module
    when it is one, else as the package)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def nested_imports(path: Path) -> list[int]:
    """Line numbers of imports inside functions or classes (not at the module's top level)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in ast.iter_child_nodes(tree)}
    for node in ast.walk(tree):  # imports under a top-level `if TYPE_CHECKING:` / `try:` still count as top level
        if isinstance(node, (ast.If, ast.Try)) and id(node) in top:
            top |= {id(child) for child in ast.walk(node)}
    return [
        node.lineno for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top
    ]


# The grid file's one door, and the writers of other formats that happen to be HDF5 too.
HDF5_DOOR = "psfgen/gridfile.py"
HDF5_OTHER_FORMATS = {"psfcvae/api/sample.py": "psf sample --out x.h5, a file of PSFs of its own"}


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, " -> ".join(cycle)


def test_imports_sit_at_the_top_except_where_cli_keeps_help_fast():
    for name, path in _modules().items():
        if name != "cli":
            lines = nested_imports(path)
            assert not lines, f"{path.relative_to(ROOT)}: imports inside a function at lines {lines}"


def test_only_the_grid_file_module_opens_hdf5_files():
    users = {str(p.relative_to(ROOT)) for p in _modules().values() if "h5py" in imported_modules(p)}
    assert users == {HDF5_DOOR, *HDF5_OTHER_FORMATS}, users


def test_the_layout_checks_catch_what_they_forbid(tmp_path):
    # The oracle of the three checks above: a circle, a nested import and a second reader of HDF5 are found.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    code = tmp_path / "m.py"
    code.write_text("import os\n\n\ndef f():\n    import h5py\n    return h5py\n")
    assert nested_imports(code) == [5]
    assert "h5py" in imported_modules(code)
