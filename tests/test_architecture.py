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


def test_strategies_never_import_callbacks_tasks_or_the_cli() -> None:
    # Strategies are the floor below the callbacks: a callback may read a strategy, never the reverse.
    files = sorted((PACKAGE / "strategies").glob("*.py"))
    assert files
    for path in files:
        bad = [n for n in _imports(path) if n.startswith(("lightning_scale.callbacks", "lightning_scale.tasks", "lightning_scale.cli"))]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def _strategy_chain(node: ast.AST) -> bool:
    """Whether an attribute chain goes through a strategy or a pipeline runtime (``trainer.strategy.x``)."""
    while isinstance(node, ast.Attribute):
        if node.attr in ("strategy", "runtime", "engine"):
            return True
        node = node.value
    return isinstance(node, ast.Name) and node.id in ("strategy", "s", "runtime", "engine")


def test_callbacks_use_only_the_public_attributes_of_strategies() -> None:
    # A callback that reads ``trainer.strategy._something`` breaks silently when a strategy's
    # inside changes; what callbacks need is public (runtime, engine, communication_groups, ...).
    files = sorted((PACKAGE / "callbacks").glob("*.py"))
    assert files
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and _strategy_chain(node.value):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and str(node.args[1].value).startswith("_") and _strategy_chain(node.args[0]):
                found.append(f"{path.name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert not found, f"callbacks reach into private strategy attributes: {found}"


def test_the_private_attribute_check_can_fail(tmp_path) -> None:
    source = "def f(trainer):\n    return trainer.strategy._rank_processes, getattr(trainer.strategy.runtime, '_x', None)\n"
    tree = ast.parse(source)
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_") and _strategy_chain(n.value)]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "getattr"
             and _strategy_chain(n.args[0])]
    assert len(hits) == 1 and len(calls) == 1


def test_moved_paths_keep_working_for_one_release_with_a_deprecation_warning() -> None:
    import pytest

    from lightning_scale.strategies.base import MeshStrategy
    from lightning_scale.strategies.options import check_tp_plan

    with pytest.warns(DeprecationWarning, match="import MeshStrategy from lightning_scale.strategies.base"):
        from lightning_scale.strategies.mesh import MeshStrategy as old
    assert old is MeshStrategy
    with pytest.warns(DeprecationWarning, match="import check_tp_plan from lightning_scale.strategies.options"):
        from lightning_scale.strategies.mesh import check_plan
    assert check_plan is check_tp_plan
    with pytest.warns(DeprecationWarning, match="lightning_scale.core.fsdp"):
        from lightning_scale.core.sharding import fully_shard_blocks
    from lightning_scale.core.fsdp import fully_shard_blocks as new

    assert fully_shard_blocks is new
    from lightning_scale.strategies import ZeroStrategy

    with pytest.warns(DeprecationWarning, match="use implementation="):
        strategy = ZeroStrategy(stage=1, backend="fairscale")
    assert strategy.zero.implementation == "fairscale"
    with pytest.warns(DeprecationWarning, match="read .implementation"):
        assert strategy.zero.backend == "fairscale"
    with pytest.raises(ValueError, match="pass only implementation="):
        ZeroStrategy(stage=1, backend="fairscale", implementation="fairscale")
