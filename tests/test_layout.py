"""The import graph runs one way: cli -> psfcvae -> psfgen -> psfgen.shared, never back."""

from __future__ import annotations

import ast
import importlib.util

import pytest
from helpers import ROOT


def imported_modules(path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
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


def test_the_scan_sees_imports():  # the oracle itself: it would catch the import issue 10 removed
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
