"""The package's layers import one way only, and docs/architecture.md lists every module.

Every import statement of every module is read from its syntax tree (lazy imports inside
functions included), so a layer violation fails here even on a code path no other test runs.
"""

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gemma4_nb"

# layer -> the layers of this package it may import (itself included)
ALLOWED = {
    "errors": set(),
    "kernels": {"kernels"},
    "runtime": {"errors", "kernels", "runtime"},
    "backends": {"errors", "kernels", "runtime", "backends"},
    "notebook": {"errors", "kernels", "runtime", "backends", "notebook"},
}
# third-party packages of the notebook front end, never imported below the notebook layer
FRONTEND = {"IPython", "ipywidgets", "ipykernel", "comm", "nbformat", "nbclient", "jupyter_client"}


def modules():
    """``(path, parts)`` of every module; ``gemma4_nb/kernels`` is a link to the top-level folder."""
    found = [Path(d) / f for d, _, files in os.walk(PKG, followlinks=True) for f in files if f.endswith(".py")]
    for path in sorted(found):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "labextension":
            continue
        parts = list(rel.with_suffix("").parts)
        yield path, parts


def imports(path: Path, parts: list[str]):
    """Absolute names of everything ``path`` imports: ``gemma4_nb.x.y`` or a third-party top name."""
    package = ["gemma4_nb", *parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x: x may be a module
                    for alias in node.names:
                        yield f"{mod}.{alias.name}"
                    continue
                yield mod
            else:
                yield node.module


def test_the_package_has_the_layers():
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} >= {
        "kernels", "runtime", "backends", "notebook", "devtools"}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_one_way(layer):
    bad = []
    for path, parts in modules():
        if parts[0] != layer:
            continue
        for name in imports(path, parts):
            top = name.split(".")[0]
            if top == "gemma4_nb":
                target = name.split(".")[1] if "." in name else "__init__"
                if target not in ALLOWED[layer]:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif layer != "notebook" and top in FRONTEND:
                bad.append(f"{path.relative_to(ROOT)} imports {name} (a notebook front-end package)")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk above catches a lazy import inside a function, relative or absolute."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..notebook.copilot import Copilot\n    import IPython\n")
    found = set(imports(src, ["runtime", "m"]))
    assert {"gemma4_nb.notebook.copilot", "IPython"} <= found


def test_architecture_lists_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path, parts in modules():
        rel = "/".join(parts) + ".py"
        if f"`{rel}`" not in doc:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not list: {', '.join(missing)}"
