"""The package's size rules (issue 10): no file past ~450 lines, no function past ~80, so that each
piece is of a size a reader takes in at once; and the layers import downward only."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "mmea_kernels"
FILES = sorted(PKG.rglob("*.py"))
# layer -> the layers it may import (relative imports inside the package)
LAYERS = ["layout", "linear_spec", "ops", "nn", "peft", "integrations", "train", "app"]


def _layer(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).with_suffix("").parts
    return rel[0]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_file_and_function_sizes(path):
    src = path.read_text()
    assert src.count("\n") <= 460, f"{path.name}: {src.count(chr(10))} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path.name}: functions longer than 80 lines: {long}"


@pytest.mark.parametrize("path", [f for f in FILES if _layer(f) in LAYERS], ids=lambda p: str(p.relative_to(PKG)))
def test_layers_import_downward_only(path):
    """A module of layer k imports (at module level or inside functions) only layers <= k."""
    mine = LAYERS.index(_layer(path))
    pkg_parts = path.relative_to(PKG).with_suffix("").parts[:-1] if path.name != "__init__.py" else \
        path.relative_to(PKG).parts[:-1]
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = list(pkg_parts[: len(pkg_parts) - (node.level - 1)]) if node.level > 1 else list(pkg_parts)
            target = base + (node.module.split(".") if node.module else [])
            if not target:  # "from .. import x" at the package root
                target = [node.names[0].name]
            top = target[0]
            if top in LAYERS and LAYERS.index(top) > mine:
                bad.append(".".join(target))
    assert not bad, f"{path.relative_to(PKG)} (layer {LAYERS[mine]}) imports higher layers: {bad}"
