"""The layering the design guide asks for: the core imports torch, never lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_scale

PACKAGE = Path(lightning_scale.__file__).parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return names


def test_core_and_models_never_import_lightning() -> None:
    files = sorted((PACKAGE / "core").glob("*.py")) + sorted((PACKAGE / "models").glob("*.py"))
    assert files
    for path in files:
        bad = [n for n in _imports(path) if n.split(".")[0] in {"lightning", "pytorch_lightning"}]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}: the core must stay torch-only"


def test_core_never_imports_the_adapters() -> None:
    for path in sorted((PACKAGE / "core").glob("*.py")):
        bad = [n for n in _imports(path) if n.startswith(("lightning_scale.strategies", "lightning_scale.callbacks", "lightning_scale.tasks", "lightning_scale.cli"))]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
