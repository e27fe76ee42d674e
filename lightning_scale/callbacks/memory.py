"""``MemoryAccountant``: where a rank's memory goes, measured on one sampled training step.

Per rank, on the optimizer step with index ``sample_step`` (default 1: the first step that starts
with optimizer state already allocated):

* **model states** (parameters, gradients, optimizer state) are counted exactly from the tensors
  in ``on_train_batch_end``, right after the optimizer step: the gradients of this step are still
  alive there (Lightning clears them with ``set_to_none`` inside the *next* step's closure, after
  its forward). Same rules as :func:`lightning_scale.core.memory.model_state_bytes`: each storage
  once, DTensors by local shard, ZeRO-1/2 engine buffers (``strategy.engine().held_tensors()``)
  and fairscale OSS partition state (``optimizer.optim``) included;
* **activations** are the storages the training step's forward creates that are still alive when
  the backward starts (:class:`~lightning_scale.core.activation_memory.HeldActivationMeter`, from
  ``on_train_batch_start`` to ``on_before_backward`` of the sampled step's first micro-batch),
  leaving out parameters, buffers, the batch, the loss, and whatever of them is still alive at
  the end of the step (``on_train_batch_end``): that is kept state, not activations (the step's
  outputs, values logged with ``self.log``, DDP's gradient buckets, which DDP rebuilds inside its
  second forward). Pipeline strategies (``strategy.runtime``) run the microbatches' forwards *and*
  backwards inside the training step: there the meter stays open for the whole step and is read
  after each microbatch's forward through this rank's stage (a forward hook); the figure is the
  largest reading, the activations of the microbatches in flight at that moment (under 1F1B,
  ``p - r`` on pipeline rank ``r`` of ``p``), parameters' gradients left out. Buffers alive at
  that moment for the stage-to-stage transfers count as well;
* **DDP gradient buckets**: under ``DistributedDataParallel`` with ``gradient_as_bucket_view=False``
  (Lightning's default) the reducer keeps a flat copy of every gradient for its all-reduce, not
  reachable as a tensor: its size comes from DDP's own logging data (``bucket_sizes``) and is
  reported on its own (0 with ``gradient_as_bucket_view=True``: the gradients are then views of
  the buckets, already counted);
* **peak**: on CUDA the allocator's ``max_memory_allocated`` / ``max_memory_reserved`` of the
  root device and ``num_alloc_retries``, reset at train start (the table refreshes them at the
  end of fit). On CPU torch has no allocator peak: the figure is the exact tensor sum model
  states + DDP buckets + activations of the sampled step (gradients and activations summed, op
  temporaries left out); process RSS is not used, it is not a tensor figure.

Metric namespace (logged once, at the sampled step, to every Lightning logger, by rank 0; bytes):

=====================================  =============================================================
``memory/params_bytes``                rank 0's parameters (all devices)
``memory/grads_bytes``                 rank 0's gradients, incl. sharding engines' gradient buffers
``memory/optimizer_bytes``             rank 0's optimizer state (+ master copies not counted above)
``memory/model_states_bytes``          the three above
``memory/activations_bytes``           rank 0's held activations (absent when not measured)
``memory/peak_bytes``                  CUDA: ``max_memory_allocated``; CPU: model states + DDP
                                       buckets + activations (absent when activations are not
                                       measured)
``memory/ddp_buckets_bytes``           DDP's gradient buckets not already counted (DDP only)
``memory/peak_reserved_bytes``         CUDA only: ``max_memory_reserved``
``memory/alloc_retries``               CUDA only: ``memory_stats()["num_alloc_retries"]``
``memory/by_device/<cat>/<device>``    ``<cat>`` in params, grads, optimizer (device as ``cpu``,
                                       ``cuda:0``) and activations (device type)
``memory/by_dtype/<cat>/<dtype>``      params, grads, optimizer by dtype (``float32``, ...)
``memory/<name>_max``                  max over ranks of params, grads, optimizer, model_states,
                                       activations, peak (``_bytes`` names; one all-gather)
``memory/peak_rank``                   the rank with the largest peak (or model states)
``memory/predicted/<cat>_bytes``       the planner's prediction for rank 0
                                       (:func:`lightning_scale.callbacks._run_layout.predict_run`),
                                       when it models the run
=====================================  =============================================================

At the end of fit rank 0 prints a ``rich`` table (a measured and a predicted row per rank) and
writes ``memory_per_rank.png`` (stacked bars per rank) to the run directory (``trainer.log_dir``,
else ``trainer.default_root_dir``). On an out-of-memory error every failing rank writes
``memory_oom_rank<R>.json`` there before the exception propagates.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_scale.core import device as dev
from lightning_scale.core.activation_memory import HeldActivationMeter
from lightning_scale.core.memory import CATEGORIES, model_state_breakdown

PARTS = ("params", "grads", "optimizer", "activations")
PNG_NAME = "memory_per_rank.png"


# -- exact counting -----------------------------------------------------------------------------
def _sum_by(breakdown: dict[tuple[str, str], int], index: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, nbytes in breakdown.items():
        out[key[index]] = out.get(key[index], 0) + nbytes
    return out


def model_state_sources(trainer: Any) -> tuple[list[torch.optim.Optimizer], dict[str, list[torch.Tensor]] | None]:
    """The optimizers whose state to count (fairscale OSS: its partition's ``.optim``) and the
    tensors a ZeRO engine holds outside them (``strategy.engine(optimizer).held_tensors()``)."""
    raw = list(trainer.optimizers)
    optimizers = [o.optim if isinstance(getattr(o, "optim", None), torch.optim.Optimizer) else o for o in raw]
    engine_of = getattr(trainer.strategy, "engine", None)
    if not callable(engine_of):
        return optimizers, None
    engines: list[Any] = []
    for o in raw:
        engine = engine_of(o)
        if engine is not None and all(engine is not e for e in engines):
            engines.append(engine)
    if not engines and engine_of() is not None:
        engines.append(engine_of())
    extra: dict[str, list[torch.Tensor]] = {}
    for engine in engines:
        for category, tensors in engine.held_tensors().items():
            extra.setdefault(category, []).extend(tensors)
    return optimizers, extra or None


def _ddp_bucket_bytes(trainer: Any) -> int | None:
    """Bytes of DDP's gradient communication buckets not counted as gradients (DDP's own logging
    data), or None when the strategy's model is not a ``DistributedDataParallel`` (or the data
    cannot be read). 0 under ``gradient_as_bucket_view=True``: the ``.grad`` tensors are then views
    of the buckets, already counted."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(trainer.strategy, "model", None)
    if not isinstance(model, DistributedDataParallel):
        return None
    try:
        data = model._get_ddp_logging_data()
        if data.get("gradient_as_bucket_view"):
            return 0
        sizes = str(data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or "")
        return sum(int(x) for x in sizes.replace(",", " ").split())
    except Exception:  # noqa: BLE001 - a private DDP API: omit rather than guess
        return None


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]


def _is_oom(exception: BaseException) -> bool:
    return isinstance(exception, torch.cuda.OutOfMemoryError) or (
        isinstance(exception, RuntimeError) and "out of memory" in str(exception).lower())


class _ActivationWindow:
    """The activation measurement of the sampled training step, from the start of its first
    micro-batch to its end: a :class:`HeldActivationMeter` opened at construction and read once.

    * Forward then backward (every strategy but the pipelines): :meth:`before_backward` closes the
      meter and reads what the forward left for the backward (the loss left out).
    * Pipelines (forward and backward of every microbatch inside the step): a forward hook on each
      of this rank's stage modules reads the meter after every microbatch forward; the largest
      reading (the microbatches in flight) is the figure, parameters' gradients left out.

    :meth:`close` (at the step's end) returns ``(activations {device type: bytes} or None, note)``;
    with a read at backward, it subtracts what the step still keeps beyond its backward (the outputs,
    Lightning's copy of the loss, logged values, DDP's gradient buckets rebuilt in its second
    forward). :meth:`abort` (exception, end of training) releases the meter and hooks.
    """

    def __init__(self, exclude: list[torch.Tensor], stage_modules: list[torch.nn.Module] | None,
                 params: list[torch.Tensor], settle: float) -> None:
        self.settle = settle
        self._meter: HeldActivationMeter | None = HeldActivationMeter(exclude=exclude)
        self._hooks: list[Any] = []
        self._peak: dict[str, int] = {}
        self._at_backward: dict[str, int] | None = None  # the read at on_before_backward
        self._measured_by: HeldActivationMeter | None = None  # the meter of that read (closed)
        self._loss: torch.Tensor | None = None
        if stage_modules is not None:
            def after_forward(module, args, output) -> None:
                if self._meter is None:
                    return
                grads = [p.grad for p in params if p.grad is not None]  # from earlier backwards: not activations
                now = self._meter.held(exclude=grads)
                if sum(now.values()) > sum(self._peak.values()):
                    self._peak = now

            self._hooks = [m.register_forward_hook(after_forward) for m in stage_modules]
        self._meter.__enter__()

    def _close_meter(self) -> HeldActivationMeter | None:
        meter, self._meter = self._meter, None
        if meter is not None:
            meter.__exit__(None, None, None)
        return meter

    def _remove_hooks(self) -> bool:
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h.remove()
        return bool(hooks)

    def before_backward(self, loss: torch.Tensor) -> None:
        if self._hooks:  # pipeline: the backwards run inside the schedule; read at close()
            return
        meter = self._close_meter()
        if meter is not None:  # the first backward of the step (accumulation: its first micro-batch)
            self._at_backward = meter.held(exclude=[loss], settle=self.settle)
            self._measured_by, self._loss = meter, loss

    def close(self) -> tuple[dict[str, int] | None, str | None]:
        if self._remove_hooks():
            self._close_meter()
            return (self._peak or None), "pipeline: largest held bytes after a microbatch forward (microbatches in flight)"
        if self._close_meter() is not None:  # no backward ran (training_step returned None, manual optimization)
            warnings.warn("MemoryAccountant: the sampled step ran no backward (on_before_backward was not called); "
                          "activations are not measured", stacklevel=3)
            return None, "no backward ran in the sampled step"
        activations = self._at_backward
        if activations is not None and self._measured_by is not None:
            kept = self._measured_by.held(exclude=[self._loss], settle=self.settle)
            for device, nbytes in kept.items():
                activations[device] = activations.get(device, 0) - nbytes
        self._loss = None
        return activations, None

    def abort(self) -> None:
        self._remove_hooks()
        self._close_meter()
        self._loss = None


class MemoryAccountant(Callback):
    """Per-rank memory of parameters, gradients, optimizer state and activations, measured on one
    sampled training step (see the module docstring for what is measured where, and the metrics).

    Args:
        sample_step: index of the optimizer step to measure (``trainer.global_step`` when the
            step starts; 0 is the first step, whose forward runs before the optimizer state exists).
        log: log the figures (``memory/...``) to the trainer's loggers (rank 0).
        print_table: print a ``rich`` table of every rank's figures, measured and predicted, at
            the end of fit (rank 0).
        plot: write ``memory_per_rank.png`` (stacked bars per rank) to the run directory (rank 0).
        oom_dump: on an out-of-memory error write ``memory_oom_rank<R>.json`` to the run directory.
        dirpath: run directory for the PNG and the OOM dump; default ``trainer.log_dir``, else
            ``trainer.default_root_dir``.
        traced_prediction: for a model the planner's closed forms do not cover (anything but the
            suite's GPT, ViT and ResNet), predict rank 0's figures by tracing the run's own
            LightningModule on fake tensors in a child process (once, at the sampled step, rank 0
            only; its time grows with the model: seconds for the tests' small modules). It is rebuilt as
            ``cls(**self.hparams)``: call ``save_hyperparameters()`` in ``__init__``.

    After fit, ``record`` holds this rank's figures and ``records`` every rank's (index = rank;
    every rank has them), or None when training ended before the sampled step.
    """

    def __init__(self, sample_step: int = 1, log: bool = True, print_table: bool = True, plot: bool = True,
                 oom_dump: bool = True, dirpath: str | None = None, traced_prediction: bool = True) -> None:
        if isinstance(sample_step, bool) or not isinstance(sample_step, int) or sample_step < 0:
            raise ValueError(f"sample_step must be an int >= 0 (the optimizer step to measure; 1 = the first step "
                             f"with optimizer state); got {sample_step!r}")
        for name, value in (("log", log), ("print_table", print_table), ("plot", plot), ("oom_dump", oom_dump),
                            ("traced_prediction", traced_prediction)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False; got {value!r}")
        if dirpath is not None and (not isinstance(dirpath, (str, Path)) or not str(dirpath)):
            raise ValueError(f"dirpath must be a non-empty path or None (None: the trainer's log_dir); got {dirpath!r}")
        self.sample_step = sample_step
        self.log = log
        self.print_table = print_table
        self.plot = plot
        self.oom_dump = oom_dump
        self.dirpath = dirpath
        self.traced_prediction = traced_prediction
        self.record: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] | None = None
        self.png_path: Path | None = None
        self.oom_path: Path | None = None
        self._reset()

    def _reset(self) -> None:
        self._started = False  # the sampled step's first micro-batch has begun
        self._window: _ActivationWindow | None = None  # open from that start to the step's end
        self._activations: dict[str, int] | None = None  # {device type: bytes}, once the window closed
        self._activations_note: str | None = None
        self._run_dir: Path | None = None

    # -- fit -------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Every rank at the same point: trainer.log_dir is a collective (a broadcast) under some strategies.
        self._reset()
        self.record = self.records = None
        self.png_path = self.oom_path = None
        self._run_dir = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir)
        device = trainer.strategy.root_device
        if dev.is_cuda(device):
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._started or trainer.global_step != self.sample_step:
            return
        self._started = True
        runtime = getattr(trainer.strategy, "runtime", None)
        self._window = _ActivationWindow(
            exclude=[*pl_module.parameters(), *pl_module.buffers(), *_batch_tensors(batch)],
            stage_modules=runtime.stage_modules if runtime is not None else None,
            params=list(pl_module.parameters()),
            settle=0.5 if trainer.world_size > 1 else 0.0,  # a gloo worker may hold a finished collective's buffers
        )

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._window is not None:
            self._window.before_backward(loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        window, self._window = self._window, None
        if window is not None:
            self._activations, self._activations_note = window.close()
        if not self._started or self.record is not None or trainer.global_step <= self.sample_step:
            return  # not the sampled step, or an accumulation micro-batch before its optimizer step
        self.record = self._measure(trainer, pl_module, batch)
        self.records = self._gather(self.record)
        if self.log and trainer.is_global_zero:
            row = self._row(self.record, self.records)
            for logger in trainer.loggers:
                logger.log_metrics(row, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        window, self._window = self._window, None
        if window is not None:
            window.abort()
        if self.record is None:
            if trainer.is_global_zero:
                warnings.warn(f"MemoryAccountant: training ended before optimizer step {self.sample_step} finished; "
                              f"nothing was measured (lower sample_step)", stacklevel=2)
            return
        if dev.is_cuda(trainer.strategy.root_device):  # the run's peak, not the sampled step's
            self.record.update(self._cuda_peaks(trainer.strategy.root_device))
            self.record["peak"] = self.record["cuda_max_allocated"]
            self.records = self._gather(self.record)
        if not trainer.is_global_zero:
            return
        if self.print_table:
            self._print_table(self.records)
        if self.plot:
            try:
                self.png_path = self._plot(self.records, self._run_dir or Path(trainer.default_root_dir))
            except Exception as err:  # noqa: BLE001 - a chart must not fail the run
                warnings.warn(f"MemoryAccountant: could not write {PNG_NAME} ({type(err).__name__}: {err})",
                              stacklevel=2)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning re-raises the exception after this hook: write what is known, never swallow it.
        window, self._window = self._window, None
        if window is not None:
            window.abort()
        if self.oom_dump and _is_oom(exception):
            try:
                self.oom_path = self._dump_oom(trainer, pl_module, exception)
            except Exception as err:  # noqa: BLE001 - the OOM is the error to report
                warnings.warn(f"MemoryAccountant: could not write the OOM dump ({type(err).__name__}: {err})",
                              stacklevel=2)

    # -- measuring ------------------------------------------------------------------------------
    def _model_states(self, trainer, pl_module) -> dict[str, Any]:
        optimizers, extra = model_state_sources(trainer)
        breakdown = model_state_breakdown(pl_module, optimizers, extra)
        out: dict[str, Any] = {c: sum(breakdown[c].values()) for c in CATEGORIES}
        out["by_device"] = {c: _sum_by(breakdown[c], 0) for c in CATEGORIES}
        out["by_dtype"] = {c: _sum_by(breakdown[c], 1) for c in CATEGORIES}
        return out

    @staticmethod
    def _cuda_peaks(device: torch.device) -> dict[str, int]:
        stats = torch.cuda.memory_stats(device)
        return {"cuda_max_allocated": int(torch.cuda.max_memory_allocated(device)),
                "cuda_max_reserved": int(torch.cuda.max_memory_reserved(device)),
                "alloc_retries": int(stats.get("num_alloc_retries", 0))}

    def _measure(self, trainer, pl_module, batch) -> dict[str, Any]:
        record: dict[str, Any] = {"rank": trainer.global_rank, "step": self.sample_step}
        record.update(self._model_states(trainer, pl_module))
        record["ddp_buckets"] = _ddp_bucket_bytes(trainer)
        activations = self._activations
        record["activations"] = sum(activations.values()) if activations is not None else None
        record["by_device"]["activations"] = dict(activations) if activations is not None else None
        record["activations_note"] = self._activations_note
        device = trainer.strategy.root_device
        if dev.is_cuda(device):
            record.update(self._cuda_peaks(device))
            record["peak"] = record["cuda_max_allocated"]
            record["peak_kind"] = "cuda max_memory_allocated (root device)"
        else:
            states = record["params"] + record["grads"] + record["optimizer"] + (record["ddp_buckets"] or 0)
            record["peak"] = states + record["activations"] if activations is not None else None
            record["peak_kind"] = "tensor sum: model states (+ DDP buckets) + activations"
        record["predicted"], record["predicted_source"] = self._predict(trainer, pl_module, batch)
        return record

    def _predict(self, trainer, pl_module, batch) -> tuple[dict[str, int] | None, str | None]:
        """(prediction, its source): the closed form for the suite's models; else, on rank 0 and
        with ``traced_prediction``, the run's LightningModule traced in a child process
        (:mod:`lightning_scale.callbacks._traced_prediction`)."""
        from lightning_scale.callbacks._run_layout import predict_run

        try:
            predicted = predict_run(trainer, pl_module, batch)
            if predicted is not None:
                return {k: int(predicted.get(k, 0)) for k in (*PARTS, "ddp_buckets")}, "closed form"
        except Exception as err:  # noqa: BLE001 - a prediction must not stop training
            warnings.warn(f"MemoryAccountant: the planner's prediction failed ({type(err).__name__}: {err}); "
                          f"the predicted column is left empty", stacklevel=2)
            return None, None
        if not (self.traced_prediction and trainer.is_global_zero):
            return None, None
        from lightning_scale.callbacks._traced_prediction import predict_traced, traced_spec

        spec = traced_spec(trainer, pl_module, batch)
        if isinstance(spec, str):
            warnings.warn(f"MemoryAccountant: no prediction for this run: the closed forms model the suite's models "
                          f"only, and {spec}", stacklevel=2)
            return None, None
        try:
            predicted = predict_traced(spec)
        except Exception as err:  # noqa: BLE001 - a prediction must not stop training
            warnings.warn(f"MemoryAccountant: the traced prediction failed ({type(err).__name__}: {err}); the "
                          f"predicted column is left empty", stacklevel=2)
            return None, None
        return {k: int(predicted.get(k, 0)) for k in (*PARTS, "ddp_buckets")}, "traced (rank 0)"

    @staticmethod
    def _gather(record: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's record (a collective on every rank when torch.distributed is initialised)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [record]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, record)
        return out

    @staticmethod
    def _row(record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, float]:
        row: dict[str, float] = {}
        for c in CATEGORIES:
            row[f"memory/{c}_bytes"] = record[c]
        row["memory/model_states_bytes"] = sum(record[c] for c in CATEGORIES)
        if record["activations"] is not None:
            row["memory/activations_bytes"] = record["activations"]
        if record["peak"] is not None:
            row["memory/peak_bytes"] = record["peak"]
        if record["ddp_buckets"] is not None:
            row["memory/ddp_buckets_bytes"] = record["ddp_buckets"]
        if "cuda_max_reserved" in record:
            row["memory/peak_reserved_bytes"] = record["cuda_max_reserved"]
            row["memory/alloc_retries"] = record["alloc_retries"]
        for c, by in record["by_device"].items():
            for device, nbytes in (by or {}).items():
                row[f"memory/by_device/{c}/{device}"] = nbytes
        for c, by in record["by_dtype"].items():
            for dtype, nbytes in by.items():
                row[f"memory/by_dtype/{c}/{dtype}"] = nbytes
        for name in (*CATEGORIES, "activations", "peak"):
            values = [r[name] for r in records]
            if all(v is not None for v in values):
                row[f"memory/{name}_bytes_max"] = max(values)
        states = [sum(r[c] for c in CATEGORIES) for r in records]
        row["memory/model_states_bytes_max"] = max(states)
        peaks = [r["peak"] for r in records]
        key = peaks if all(p is not None for p in peaks) else states
        row["memory/peak_rank"] = key.index(max(key))
        if record["predicted"] is not None:
            for c in PARTS:
                row[f"memory/predicted/{c}_bytes"] = record["predicted"][c]
        return {k: float(v) for k, v in row.items()}

    # -- reporting -------------------------------------------------------------------------------
    @staticmethod
    def _print_table(records: list[dict[str, Any]]) -> None:
        from rich.console import Console
        from rich.table import Table

        from rich import box

        def mib(nbytes: int | None) -> str:
            return "-" if nbytes is None else f"{nbytes / 2**20:,.2f}"

        buckets = [r.get("ddp_buckets") or 0 for r in records]
        caption = f"peak: {records[0]['peak_kind']}"
        if any(buckets):
            caption += f"\nmeasured total includes DDP gradient buckets ({mib(max(buckets))} MiB per rank)"
        table = Table(title=f"MemoryAccountant: MiB per rank, optimizer step {records[0]['step']}", caption=caption,
                      box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
        for name in ("rank", "", "params", "grads", "optimizer", "activations", "total", "peak"):
            table.add_column(name, justify="left" if name in ("rank", "") else "right", no_wrap=True)
        for r in records:
            parts = [r[p] for p in PARTS]
            total = sum(p for p in parts if p is not None) + (r.get("ddp_buckets") or 0)
            table.add_row(str(r["rank"]), "measured", *(mib(p) for p in parts), mib(total), mib(r["peak"]))
            pred = r["predicted"]
            cells = [mib(pred[p]) if pred else "-" for p in PARTS]
            pred_total = sum(pred[p] for p in PARTS) + pred.get("ddp_buckets", 0) if pred else None
            source = r.get("predicted_source")
            table.add_row("", "predicted" + (" (traced)" if source and source.startswith("traced") else ""), *cells,
                          mib(pred_total), "-")
        Console().print(table)

    @staticmethod
    def _plot(records: list[dict[str, Any]], folder: Path) -> Path:
        from matplotlib.figure import Figure  # no pyplot: the process's backend is left alone (Agg canvas)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        colors = {"params": "#4c72b0", "grads": "#dd8452", "ddp_buckets": "#f2c6a0", "optimizer": "#55a868",
                  "activations": "#c44e52"}
        stacks = ("params", "grads", "ddp_buckets", "optimizer", "activations")
        has_pred = any(r["predicted"] for r in records)
        width = 0.36 if has_pred else 0.6
        fig = Figure(figsize=(max(5.5, 1.2 * len(records) + 3.5), 4.0))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        mib = float(2**20)
        labeled: set[str] = set()
        for i, r in enumerate(records):
            bars = [("measured", {p: r.get(p) for p in stacks}, i - 0.2 if has_pred else i, None)]
            if r["predicted"]:
                bars.append(("predicted", r["predicted"], i + 0.2, "//"))
            for _, parts, x, hatch in bars:
                bottom = 0.0
                for p in stacks:
                    value = parts.get(p)
                    if not value:
                        continue
                    label = None
                    if hatch is None and p not in labeled:
                        labeled.add(p)
                        label = "DDP grad buckets" if p == "ddp_buckets" else p
                    ax.bar(x, value / mib, width, bottom=bottom, color=colors[p], hatch=hatch, edgecolor="black",
                           linewidth=0.5, label=label)
                    bottom += value / mib
        if has_pred:
            from matplotlib.patches import Patch

            handles, labels = ax.get_legend_handles_labels()
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
            labels.append("predicted (hatched)")
        else:
            handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_xticks(range(len(records)), [f"rank {r['rank']}" for r in records])
        ax.set_ylabel("MiB")
        note = "" if all(r["activations"] is not None for r in records) else " (activations not measured)"
        ax.set_title(f"memory per rank, optimizer step {records[0]['step']}{note}", fontsize=10)
        fig.tight_layout()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PNG_NAME
        fig.savefig(path, dpi=100)
        return path

    def _dump_oom(self, trainer, pl_module, exception: BaseException) -> Path:
        folder = self._run_dir or Path(self.dirpath or trainer.default_root_dir)  # no collective here
        report: dict[str, Any] = {"rank": trainer.global_rank, "global_step": trainer.global_step,
                                  "exception": f"{type(exception).__name__}: {exception}",
                                  "sampled_step": self.record}
        try:
            report["model_states_now"] = self._model_states(trainer, pl_module) if pl_module is not None else None
        except Exception as err:  # noqa: BLE001
            report["model_states_now"] = f"not counted: {type(err).__name__}: {err}"
        device = trainer.strategy.root_device
        if dev.is_cuda(device):
            report["cuda"] = {**self._cuda_peaks(device), "allocated": int(torch.cuda.memory_allocated(device)),
                              "reserved": int(torch.cuda.memory_reserved(device)),
                              "memory_summary": torch.cuda.memory_summary(device)}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"memory_oom_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(report, indent=2, default=str))
        warnings.warn(f"MemoryAccountant: out of memory on rank {trainer.global_rank}; wrote {path}", stacklevel=2)
        return path

