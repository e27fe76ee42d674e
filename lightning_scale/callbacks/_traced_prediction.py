"""MemoryAccountant's prediction for a model the closed forms do not cover: the run's own
LightningModule traced on fake tensors (:mod:`lightning_scale.plan_trace`) in a child process.

The child is needed because tracing plays one rank under torch's fake process group, and a
process holds one default group: the run's. What the child gets (JSON on stdin): the
LightningModule's import path and ``hparams`` (it is rebuilt as ``cls(**hparams)``: modules that
call ``save_hyperparameters()`` or take no arguments), the training batch's tensor shapes and
dtypes (zeros of those: values do not matter on fake tensors), the run's layout (the planner's
``Layout`` fields), world size, precision and the optimizer implementation torch picks on the
run's device. It traces rank 0 and prints the parts as JSON.

What it predicts (bytes, rank 0; the layouts traced are symmetric, every rank holds the same):
``params`` and ``optimizer`` (states) between steps, ``grads`` at the optimizer step,
``activations`` at the forward's peak (what the forward allocated and still holds there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch

#: seconds the child may take (imports and a traced step of a model that fits a CPU test)
TIMEOUT_S = 300


def traced_spec(trainer: Any, pl_module: Any, batch: Any) -> dict[str, Any] | str:
    """What the child needs, or the reason the run cannot be traced (a sentence)."""
    from lightning_scale.callbacks._run_layout import _optimizer_impl, layout_of

    cls = type(pl_module)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return (f"{cls.__qualname__} is defined in {'a script' if cls.__module__ == '__main__' else 'a function'}: "
                f"the traced prediction rebuilds it by import path (move it to a module)")
    try:
        hparams = json.loads(json.dumps(dict(getattr(pl_module, "hparams", {}) or {})))
    except (TypeError, ValueError):
        return f"{cls.__qualname__}.hparams are not JSON values: the traced prediction cannot rebuild it"
    found = layout_of(trainer.strategy, trainer.world_size)
    if found is None:
        return f"{type(trainer.strategy).__name__} with these options is not one the planner models"
    fields, _ = found
    if fields.get("pp", 1) > 1:
        return "a pipeline run's traced prediction is not made from inside the run yet"
    try:
        tensors = _shapes(batch)
    except TypeError as err:
        return str(err)
    return {"module": cls.__module__, "qualname": cls.__qualname__, "hparams": hparams, "batch": tensors,
            "layout": fields, "world_size": trainer.world_size, "precision": str(trainer.precision),
            "optimizer_impl": _optimizer_impl(trainer, pl_module), "sys_path": [p for p in sys.path if p]}


def _shapes(batch: Any) -> Any:
    """The batch's structure with each tensor as ``{"shape": [...], "dtype": "int64"}``."""
    if isinstance(batch, torch.Tensor):
        return {"shape": list(batch.shape), "dtype": str(batch.dtype).removeprefix("torch.")}
    if isinstance(batch, (list, tuple)):
        return {"sequence": [_shapes(b) for b in batch], "tuple": isinstance(batch, tuple)}
    if isinstance(batch, dict):
        return {"mapping": {str(k): _shapes(v) for k, v in batch.items()}}
    raise TypeError(f"the batch holds a {type(batch).__name__}: the traced prediction rebuilds tensors, lists, tuples "
                    f"and dicts of them")


def _zeros(spec: Any) -> Any:
    if "shape" in spec:
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
    if "sequence" in spec:
        items = [_zeros(s) for s in spec["sequence"]]
        return tuple(items) if spec["tuple"] else items
    return {k: _zeros(v) for k, v in spec["mapping"].items()}


def predict_traced(spec: dict[str, Any], timeout: float = TIMEOUT_S) -> dict[str, int]:
    """Run the child on ``spec``; return ``{"params", "grads", "optimizer", "activations",
    "ddp_buckets"}`` in bytes. Raises ``RuntimeError`` with the child's last words on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(spec["sys_path"])
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"):
        env.pop(name, None)  # the child is not a rank of the run
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError("tracing the model failed: " + " | ".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main() -> int:
    import importlib

    from lightning_scale.core.planner import Layout
    from lightning_scale.plan_trace import TracedRecipe, strategy_for, trace_recipe

    spec = json.loads(sys.stdin.read())
    cls = importlib.import_module(spec["module"])
    for part in spec["qualname"].split("."):
        cls = getattr(cls, part)
    layout = Layout(**spec["layout"])
    run = TracedRecipe(name=spec["qualname"], build=lambda: cls(**spec["hparams"]), batch=_zeros(spec["batch"]),
                       strategy=strategy_for(layout), world_size=spec["world_size"], precision=spec["precision"])
    traced = trace_recipe(run, spec["optimizer_impl"])
    after, phases = traced.after_parts, traced.phase_parts
    out = {"params": after.get("params", 0), "optimizer": after.get("optimizer", 0),
           "grads": phases.get("optimizer step", {}).get("grads", 0),
           "activations": phases.get("forward", {}).get("activations", 0), "ddp_buckets": 0}
    if layout.ddp_buckets and spec["world_size"] > 1 and layout.zero_stage == 0 and layout.tp == 1:
        out["ddp_buckets"] = out["grads"]  # torch DDP's flat copy of the gradients (see plan_trace.trace_plan)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
