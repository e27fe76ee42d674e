"""A loss computed inline in ``training_step``, under pipeline parallelism.

The pipeline schedule needs ``loss_fn(output, target)`` on the last stage, per microbatch; a
module written the usual way computes its loss inline::

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

:class:`PipelineStrategy` runs such a step unchanged, in three parts:

1. **Capture** (every rank): ``training_step(batch)`` runs until it calls the network; that
   call's positional arguments are the pipeline's inputs, and the step stops there
   (:func:`capture_network_inputs`). Nothing after the network call runs.
2. **Replay** (last stage, once per microbatch, inside the schedule): ``training_step`` runs on
   the microbatch's rows of the batch, with the network call returning the stage's output for
   that microbatch; what it returns (or its ``"loss"``) is the microbatch loss the schedule
   back-propagates (:func:`replay_loss`). The microbatch is known by its row indices, which the
   schedule carries as the "target" (``torch.arange(B)``, cut like the inputs).
3. **Logging** (every rank): ``self.log`` / ``self.log_dict`` calls of the replays are recorded,
   averaged over the microbatches (equal sizes, so a per-sample mean is the batch mean), sent
   from the last stage and logged once on every rank with their options.

What this asks of the step (checked, with errors naming the fix, raised on every rank): the
network is called once, with positional tensors; every tensor of the batch has the batch size
as its first dimension; what the step passes to the network for a microbatch's rows is those
rows of what it passed for the whole batch (a step that draws random numbers or pads per batch
before the network call is refused: its replay would see other inputs); the loss is a mean over
equal-sized microbatches (``reduction="sum"``, or a mean over a varying number of unmasked
tokens, is averaged per microbatch and differs from the full batch's); logged values are
reduced by mean. Capture and replays run with the random state forked, so they do not move the
run's random streams. Code before the network call runs 1 + m times per step on the last stage
(side effects such as counters would repeat). Eval steps need none of this: the forward-only
schedule's output is sent to every rank of the pipeline and the user's step runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn


class _Captured(Exception):
    """Raised by the stand-in network at its first call: carries the call's arguments."""

    def __init__(self, args: tuple) -> None:
        super().__init__("network inputs captured")
        self.inputs = args


@contextlib.contextmanager
def shadowing(module: nn.Module, values: dict[str, Any]) -> Iterator[None]:
    """Instance attributes that shadow ``module``'s own (its forward, a submodule, ``log``) for
    the duration; what was in the instance dict before comes back afterwards."""
    before = {name: module.__dict__[name] for name in values if name in module.__dict__}
    module.__dict__.update(values)
    try:
        yield
    finally:
        for name in values:
            module.__dict__.pop(name, None)
        module.__dict__.update(before)


def _ignore_logging(*_: Any, **__: Any) -> None:
    return None


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """The random state restored afterwards: torch's (CPU, and the CUDA device when the run is on
    one), Python's and numpy's, so the capture, the replays and the first-batch fetch leave the
    run's random streams (data order, dropout) as they were."""
    import random

    from lightning_scale.core import device as dev

    python_state = random.getstate()
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        numpy = None
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        with torch.random.fork_rng(devices=[device] if dev.is_cuda(device) else []):
            yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


class StepError(RuntimeError):
    """A contract violation found while the last stage replayed the step; raised on every rank."""


def check_batch_rows(batch: Any, batch_size: int, owner: str) -> None:
    """Every tensor of ``batch`` has ``batch_size`` rows (checked on every rank, before the schedule)."""
    rows_of(batch, torch.arange(0), batch_size, owner, check_only=True)


def capture_network_inputs(lm: nn.Module, network_attr: str, call: str, step: Callable[..., Any], args: tuple,
                           kwargs: dict) -> tuple:
    """Run ``step(*args, **kwargs)`` until it calls the network (``network_attr`` on ``lm``:
    ``"forward"`` for layers on the LightningModule); return that call's positional arguments."""

    def stand_in(*inputs: Any, **kw: Any) -> Any:
        if kw:
            raise TypeError(
                f"under PipelineStrategy pass the network's inputs positionally ({call} got keyword arguments "
                f"{sorted(kw)}); torch's schedules cut positional tensors into microbatches"
            )
        raise _Captured(inputs)

    with shadowing(lm, {network_attr: stand_in, "log": _ignore_logging, "log_dict": _ignore_logging}):
        try:
            step(*args, **kwargs)
        except _Captured as captured:
            return captured.inputs
    raise RuntimeError(
        f"{type(lm).__name__}.{getattr(step, '__name__', 'training_step')} never called {call}; PipelineStrategy runs "
        f"the network through the pipeline, so the step must call it (once, with the batch's inputs)"
    )


def batch_size_of(inputs: tuple) -> int:
    for x in inputs:
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.shape[0]
    raise TypeError("PipelineStrategy needs tensor inputs to cut the batch into microbatches")


def rows_of(batch: Any, rows: Tensor, batch_size: int, owner: str, check_only: bool = False) -> Any:
    """The microbatch: ``rows`` (indices along dim 0) of every tensor in ``batch`` (tuples, lists
    and dicts are walked). A tensor whose first dimension is not the batch size is refused."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] != batch_size:
            raise StepError(
                f"{owner}: the batch holds a tensor of shape {tuple(batch.shape)} whose first dimension is not the batch "
                f"size {batch_size}; a training_step that computes its loss inline is replayed per microbatch on the "
                f"last stage, which cuts every tensor of the batch along dim 0. Add a loss_fn(output, target) method "
                f"and call it in training_step instead"
            )
        return batch if check_only else batch.index_select(0, rows.to(batch.device))
    if isinstance(batch, dict):
        return type(batch)((k, rows_of(v, rows, batch_size, owner, check_only)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [rows_of(v, rows, batch_size, owner, check_only) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch  # strings, numbers: the same for every microbatch


class LogRecorder:
    """Stands in for ``LightningModule.log`` / ``log_dict`` during the replays: one dict of
    ``{name: (detached value, options)}`` per microbatch, reduced once after the schedule (no
    device synchronisation inside it)."""

    def __init__(self) -> None:
        self.per_microbatch: list[dict[str, tuple[Tensor, dict]]] = []
        self._differences: list[Tensor] = []  # per replayed input: does it differ from the captured rows

    def compare(self, differences: list[Tensor]) -> None:
        self._differences.extend(differences)

    def inputs_differ(self) -> bool:
        """Whether any replay passed the network other values than the captured rows (one read)."""
        return bool(torch.stack(self._differences).any()) if self._differences else False

    def start_microbatch(self) -> None:
        self.per_microbatch.append({})

    def log(self, name: str, value: Any, **options: Any) -> None:
        reduce_fx = options.get("reduce_fx", "mean")
        if reduce_fx not in ("mean", torch.mean):
            raise StepError(
                f"self.log({name!r}, ..., reduce_fx={reduce_fx!r}) in a training_step that computes its loss inline: "
                f"under PipelineStrategy the step runs once per microbatch and logged values are averaged over them; "
                f"log a mean, or add a loss_fn(output, target) method"
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        if not isinstance(value, Tensor):
            raise StepError(
                f"under PipelineStrategy, self.log({name!r}, ...) in a training_step that computes its loss inline "
                f"takes tensors or numbers (averaged over microbatches); got {type(value).__name__}. Log metric "
                f"objects in validation_step, which runs unchanged"
            )
        self.per_microbatch[-1][name] = (value.detach().float().mean(), options)

    def log_dict(self, values: dict, **options: Any) -> None:
        for name, value in values.items():
            self.log(name, value, **options)

    def merged(self) -> dict[str, tuple[float, dict]]:
        """Mean over the microbatches of each logged name (names every microbatch logged)."""
        if not self.per_microbatch:
            return {}
        names = [n for n in self.per_microbatch[0] if all(n in mb for mb in self.per_microbatch)]
        means = torch.stack([torch.stack([mb[n][0] for mb in self.per_microbatch]).mean() for n in names]).tolist() \
            if names else []
        return {n: (v, self.per_microbatch[0][n][1]) for n, v in zip(names, means)}


def _changed_inputs(owner: str, call: str) -> str:
    return (f"{owner}.training_step passes {call} inputs for a microbatch that are not those rows of what it passed "
            f"for the whole batch (random numbers drawn, or padding or masking computed per batch, before the "
            f"network call?). Under PipelineStrategy an inline loss is computed by replaying the step per "
            f"microbatch on the last stage, which needs the same inputs; add a loss_fn(output, target) method and "
            f"call loss = self.loss_fn({call.replace('...', 'x')}, y) instead")


def replay_loss(lm: nn.Module, network_attr: str, call: str, step: Callable[..., Any], batch: Any, rest: tuple,
                kwargs: dict, output: Any, rows: Tensor, batch_size: int, recorder: LogRecorder,
                inputs: tuple) -> Tensor:
    """The microbatch loss: ``step`` on ``rows`` of ``batch`` with the network call returning
    ``output``. ``inputs``: what the step passed to the network for the whole batch; the replay
    must pass those rows of it (else :class:`StepError`)."""
    owner = type(lm).__name__
    microbatch = rows_of(batch, rows, batch_size, f"PipelineStrategy ({owner})")
    calls = [0]

    def stand_in(*args: Any, **__: Any) -> Any:
        calls[0] += 1
        if calls[0] > 1:
            raise StepError(
                f"{owner}.training_step calls {call} more than once; under PipelineStrategy a step computing its loss "
                f"inline may call the network once. Add a loss_fn(output, target) method for other steps"
            )
        expected = tuple(x.index_select(0, rows.to(x.device)) if isinstance(x, Tensor) and x.dim() else x for x in inputs)
        # Shapes and non-tensors are checked here; tensor values on the device, read once after the
        # schedule (recorder.inputs_differ), so the replay adds no host synchronisation per microbatch.
        same_layout = len(args) == len(expected) and all(
            (isinstance(a, Tensor) and isinstance(e, Tensor) and a.shape == e.shape and a.dtype == e.dtype)
            or (not isinstance(a, Tensor) and not isinstance(e, Tensor) and a == e) for a, e in zip(args, expected))
        if not same_layout:
            raise StepError(_changed_inputs(owner, call))
        recorder.compare([(a != e).any() for a, e in zip(args, expected) if isinstance(a, Tensor)])
        return output

    recorder.start_microbatch()
    with shadowing(lm, {network_attr: stand_in, "log": recorder.log, "log_dict": recorder.log_dict}):
        result = step(microbatch, *rest, **kwargs)
    loss = result.get("loss") if isinstance(result, dict) else result
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise StepError(
            f"{owner}.training_step must return the loss (a scalar tensor, or a dict with 'loss') under PipelineStrategy; "
            f"got {type(result).__name__}"
        )
    return loss
