"""``ScaleProfiler``: where a training step's time goes, throughput, MFU and stragglers, on every rank.

Metric namespace (logged every ``log_every_n_steps`` optimizer steps to every Lightning logger,
rank 0; all times in seconds, per optimizer step):

=============================  ================================================================
``perf/step_s``                wall time of the optimizer step (end of the previous step to the
                               end of this one), this rank
``perf/data_s``                waiting for batches (``on_train_batch_end`` -> next ``on_train_batch_start``)
``perf/forward_s``             ``on_train_batch_start`` -> ``on_before_backward`` (the training
                               step; under pipeline parallelism the whole schedule: forward
                               *and* backward of every microbatch)
``perf/backward_s``            ``on_before_backward`` -> ``on_after_backward``
``perf/grad_sync_s``           last ``on_after_backward`` -> ``on_before_optimizer_step``: the
                               gradient reduction the suite's strategies run after the backward
                               (data-parallel all-reduce, ZeRO-1/2 reduce-scatter, tied-weight
                               sums); about 0 under ``ddp``, which overlaps it with the backward
``perf/optimizer_s``           ``on_before_optimizer_step`` -> end of the batch (clipping, step)
``perf/other_s``               the rest (accumulation micro-steps' hooks, logging)
``perf/bubble_s``              pipeline only, measured on logged steps: schedule time - this
                               rank's busy time (its forward / backward actions, from the
                               runtime's timeline); ``perf/bubble_fraction`` = that / schedule time
``perf/bubble_theory_s``       pipeline only: schedule time x (p-1)/(v m + p-1) (theory)
``perf/comm_s``                CPU / gloo only, logged steps: seconds this rank was blocked in
                               communication during the step (all phases; it is *part of* the
                               phases above, not another phase), from
                               :class:`~lightning_scale.core.comm_timer.CommTimer`
``perf/comm_<dim>_s``          the same per mesh dimension: ``dp`` (data-parallel gradient
                               reduction, ZeRO all-gathers and reduce-scatters), ``tp`` (tensor /
                               sequence-parallel collectives inside forward and backward), ``pp``
                               (pipeline send/recv waits and the loss broadcast: part of
                               ``perf/bubble_s``), ``other``. Lightning's own ``ddp`` all-reduce runs
                               inside DDP's C++ reducer, overlapped with the backward: not seen
``perf/comm_bytes``            logged steps, CPU and CUDA: payload bytes this rank handed to
                               communication during the step (all-reduce: the tensor; all-gather:
                               the gathered tensor; reduce-scatter: the reduced input; p2p: what
                               it sends), from :class:`~lightning_scale.core.comm_bytes.CommBytes`;
                               ``perf/comm_bytes_<dim>`` per mesh dimension as above (``objects``:
                               pickled object collectives, counted by call, 0 bytes). Not under
                               Lightning's ``ddp`` (its C++ reducer is not seen)
``perf/compute_s``             forward + backward + grad_sync + optimizer - ``perf/comm_s``
                               (logged steps, with ``perf/comm_s``; under pipeline parallelism
                               it still contains the bubble's idle time not spent in a p2p wait)
``perf/samples_per_s``         global samples per optimizer step / ``perf/step_s_max``
``perf/tokens_per_s``          global tokens (samples x sequence length) / ``perf/step_s_max``
``perf/tokens_per_s_per_device``  the same / world size
``perf/model_flops_per_step``  model FLOPs of the global step (6N + 12LHQT per token, see
                               :mod:`lightning_scale.core.flops`)
``perf/hardware_flops_per_step``  with full / every-k activation checkpointing of the suite's
                               GPT: model FLOPs + the recomputed block forwards
``perf/mfu``                   model FLOPs / step time / (world size x peak FLOP/s per device);
                               omitted (with a warning) when the device's peak is unknown
``perf/step_s_min|median|max`` over ranks (an all-gather on sampled steps)
``perf/forward_s_max``, ``perf/slowest_rank``  the rank with the longest forward. Under data
                               parallelism (ddp, ZeRO-1/2) the forward has no collectives, so this
                               is a slow device, not a rank waiting for one. Under TP, ZeRO-3
                               (FSDP2) and pipeline parallelism the forward contains collectives
                               / p2p waits, which even out (or skew) the ranks' times: there the
                               figure is indicative only
=============================  ================================================================

Global counts: samples per step = per-device batch x gradient accumulation x data-parallel
replicas (pipeline microbatches split the per-device batch, they do not add samples; tensor- and
pipeline-parallel ranks of one replica see the same samples).
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_scale.core import device as dev
from lightning_scale.core import flops as flops_mod
from lightning_scale.core.comm_bytes import CommBytes
from lightning_scale.core.comm_timer import CommTimer
from lightning_scale.core.peak_flops import known_devices, lookup, peak_flops, precision_key

PHASES = ("data", "forward", "backward", "grad_sync", "optimizer", "other")


def _batch_shape(batch: Any) -> tuple[int, int | None]:
    """(samples, tokens per sample or None) of a batch: the first tensor's dim 0; dim 1 for integer token ids."""
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError(f"cannot find the batch size in a batch of type {type(batch).__name__} (expected a tensor, or "
                         f"a tuple/list/dict whose first entry is one)")
    tokens = int(first.shape[1]) if first.dim() == 2 and not torch.is_floating_point(first) else None
    return int(first.shape[0]), tokens


def _find_config(module: torch.nn.Module) -> Any:
    from lightning_scale.models import GPT, ViT

    for m in module.modules():
        if isinstance(m, (GPT, ViT)):
            return m.config
    return None


class ScaleProfiler(Callback):
    """Step-time breakdown, throughput, MFU and stragglers (see the module docstring for metrics).

    Args:
        log_every_n_steps: log (and all-gather the per-rank times) every n optimizer steps.
        flops_per_sample: model FLOPs of one trained sample (forward + backward); default:
            analytic for the suite's GPT / ViT, else measured once with FlopCounterMode on the
            LightningModule's ``example_input_array`` before the model is split, else omitted.
        peak_tflops: dense peak TFLOP/s per device for MFU; default: the table in
            :mod:`lightning_scale.core.peak_flops` by exact device name (unknown: no MFU, and a
            warning naming the reported device and these two options).
        device: the peak-FLOPs table row to take the peak from, by canonical name (e.g.
            ``"H100 SXM"``, ``"GH200"``; :func:`~lightning_scale.core.peak_flops.known_devices`)
            or exact reported name, when ``torch.cuda.get_device_name()`` reports a name the table
            lacks. The dtype column still follows the precision. Not together with ``peak_tflops``.
        straggler_threshold: a logged step's forward-time spread over ranks, (max - min) / median,
            above which the slowest rank counts as straggling on that step.
        straggler_patience: warn (once per rank, rank 0) when the same rank straggles on this many
            consecutive logged steps: a slow device persists, noise on a shared machine moves from
            rank to rank. The warning and the final table give every rank's forward times.
        trace_steps: ``(first, last)`` optimizer steps to record with ``torch.profiler`` on
            ``trace_ranks``; Chrome traces go to ``trace_dir`` (default ``<log_dir>/traces``).
        print_summary: a rich table of medians at the end of fit (rank 0).
        comm: time communication on logged steps (``perf/comm_*``; CPU only: on CUDA, host timers
            do not measure NCCL transfers, so the figures are omitted with a warning).
    """

    def __init__(self, log_every_n_steps: int = 10, flops_per_sample: float | None = None,
                 peak_tflops: float | None = None, straggler_threshold: float = 0.2,
                 trace_steps: tuple[int, int] | None = None, trace_ranks: tuple[int, ...] = (0,),
                 trace_dir: str | None = None, print_summary: bool = True, comm: bool = True,
                 device: str | None = None, straggler_patience: int = 3) -> None:
        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def positive(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value != float("inf")

        if not integer(log_every_n_steps) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be an integer >= 1; got {log_every_n_steps!r}")
        if not positive(straggler_threshold):
            raise ValueError(f"straggler_threshold must be a number > 0 (e.g. 0.2 warns at a 20% spread); got "
                             f"{straggler_threshold!r}")
        if not integer(straggler_patience) or straggler_patience < 1:
            raise ValueError(f"straggler_patience must be an integer >= 1 (consecutive logged steps on which the same "
                             f"rank straggles before a warning); got {straggler_patience!r}")
        if trace_steps is not None and not (isinstance(trace_steps, (tuple, list)) and len(trace_steps) == 2
                                            and all(integer(t) for t in trace_steps)
                                            and 0 <= trace_steps[0] <= trace_steps[1]):
            raise ValueError(f"trace_steps must be (first, last) optimizer steps with 0 <= first <= last, e.g. (5, 7), "
                             f"or None; got {trace_steps!r}")
        if not isinstance(trace_ranks, (tuple, list)) or not all(integer(r) and r >= 0 for r in trace_ranks):
            raise ValueError(f"trace_ranks must be a tuple of global ranks, e.g. (0,) or (0, 1); got {trace_ranks!r}")
        if flops_per_sample is not None and not positive(flops_per_sample):
            raise ValueError(f"flops_per_sample must be a number > 0 (model FLOPs of one trained sample, forward + "
                             f"backward) or None to compute it; got {flops_per_sample!r}")
        if peak_tflops is not None and not positive(peak_tflops):
            raise ValueError(f"peak_tflops must be a number > 0 (dense peak TFLOP/s of one device, e.g. 989 for an H100 "
                             f"SXM in bf16) or None to look it up; got {peak_tflops!r}")
        if device is not None and (not isinstance(device, str) or lookup(device) is None):
            raise ValueError(f"device must be a device of the peak-FLOPs table, one of {list(known_devices())}, or "
                             f"None to detect it; got {device!r} (or give peak_tflops=)")
        if device is not None and peak_tflops is not None:
            raise ValueError(f"give device= (a peak-FLOPs table row) or peak_tflops= (the peak itself), not both; got "
                             f"device={device!r}, peak_tflops={peak_tflops!r}")
        if not isinstance(comm, bool):
            raise ValueError(f"comm must be True or False (time communication on logged steps); got {comm!r}")
        self.log_every_n_steps = log_every_n_steps
        self.flops_per_sample = flops_per_sample
        self.peak_tflops = peak_tflops
        self.device = device
        self.straggler_threshold = straggler_threshold
        self.straggler_patience = straggler_patience
        self._streak: tuple[int, int] = (-1, 0)  # (rank straggling on the last logged steps, how many in a row)
        self._warned_stragglers: set[int] = set()
        self.straggles: dict[int, int] = {}  # rank -> logged steps on which it straggled
        self.trace_steps = trace_steps
        self.trace_ranks = tuple(trace_ranks)
        self.trace_dir = trace_dir
        self.print_summary = print_summary
        self.comm = comm
        self._comm_timer: CommTimer | None = None  # set in on_train_start when communication is timed
        self._comm_bytes: CommBytes | None = None  # set in on_train_start when communication is counted
        self.history: list[dict[str, float]] = []  # logged rows (every rank keeps its own)
        self._reset_step()
        self._last_end: float | None = None
        self._profiler: Any = None
        self._warned_mfu = False
        self._gpt_config: Any = None
        self._warned_batch = False
        self._sampled = False  # this optimizer step is logged (device sync, timeline, all-gather)
        self._trace_folder: Path | None = None
        self._opt_start: float | None = None
        self._fwd_open = False

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before the strategy splits / shards the model: the full model's shape is known here.
        if self.flops_per_sample is not None or stage != "fit":
            return
        cfg = _find_config(pl_module)
        if cfg is not None and hasattr(cfg, "vocab_size"):
            self._gpt_config = cfg  # FLOPs per token need the sequence length: taken per batch
            return
        if cfg is not None:
            self.flops_per_sample = flops_mod.vit_flops_per_image(cfg)
            return
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            # Eval mode (no running-stat updates; dropout does not change FLOPs) and a forked RNG,
            # so adding the profiler does not change the training run.
            was_training = pl_module.training
            try:
                with torch.random.fork_rng(devices=[]):
                    pl_module.eval()
                    count = flops_mod.measure_training_flops(pl_module, example, lambda out: out.float().sum())
                samples, _ = _batch_shape(example)
                self.flops_per_sample = count / samples
            except Exception as err:  # noqa: BLE001 - a metric must not stop training
                warnings.warn(f"ScaleProfiler: could not count FLOPs on example_input_array ({type(err).__name__}: {err}); "
                              f"model FLOPs and MFU are omitted. Give ScaleProfiler(flops_per_sample=...).", stacklevel=2)
            finally:
                pl_module.train(was_training)

    # -- timing ------------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._t = {p: 0.0 for p in PHASES}
        self._samples = 0
        self._tokens_per_sample: int | None = None
        self._step_start: float | None = None
        self._busy: float | None = None  # pipeline: busy seconds of the recorded schedule(s)
        self._after_backward: float | None = None

    def _now(self, trainer) -> float:
        # On CUDA, phase boundaries wait for this rank's device, but only on logged steps: on the
        # others the timings are not used and a sync would stop kernel launches running ahead.
        if self._sampled:
            dev.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        # Every rank, once per fit: state from an earlier fit must not leak into this one, and the
        # trace folder is resolved here because trainer.log_dir is a collective (a broadcast).
        self.history = []
        self._reset_step()
        self._last_end = None
        if self.trace_steps is not None:
            self._trace_folder = Path(self.trace_dir) if self.trace_dir else Path(trainer.log_dir or ".") / "traces"
        self._comm_timer = self._setup_comm_timer(trainer) if self.comm else None
        self._comm_bytes = self._setup_comm_bytes(trainer) if self.comm else None

    @staticmethod
    def _setup_comm_bytes(trainer) -> CommBytes | None:
        from lightning.pytorch.strategies import DDPStrategy

        if not (dist.is_available() and dist.is_initialized()) or isinstance(trainer.strategy, DDPStrategy):
            return None  # (DDP: warned with the timer) its all-reduce is launched by C++: not seen
        counter = CommBytes.get()
        counter.install()
        groups = getattr(trainer.strategy, "communication_groups", None)
        counter.name_groups(groups() if groups is not None else [], world=None if groups is not None else "dp")
        return counter

    @staticmethod
    def _setup_comm_timer(trainer) -> CommTimer | None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        from lightning.pytorch.strategies import DDPStrategy
        from lightning.pytorch.utilities import rank_zero_warn

        if isinstance(trainer.strategy, DDPStrategy):
            rank_zero_warn("ScaleProfiler: perf/comm_* are omitted under Lightning's DDP: its all-reduce runs inside "
                           "DDP's C++ reducer, overlapped with the backward (the exposed tail is in perf/backward_s). "
                           "The suite's strategies report it (plain data parallelism: strategy=MeshStrategy()).")
            return None
        if dev.is_cuda(trainer.strategy.root_device):
            rank_zero_warn("ScaleProfiler: perf/comm_* are omitted on CUDA: host timers do not measure asynchronous "
                           "NCCL transfers (use trace_steps= for a torch.profiler trace of the kernels)")
            return None
        timer = CommTimer.get()
        timer.install()
        groups = getattr(trainer.strategy, "communication_groups", None)
        if groups is not None:  # the suite's strategies: a process group per mesh dimension, and more
            timer.name_groups(groups())
        else:  # Lightning's FSDP, ModelParallelStrategy, ...: the world is the data-parallel group
            timer.name_groups([], world="dp")
        return timer

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last_end = None  # validation between steps is not the next step's data wait

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._step_start is None:
            self._sampled = (trainer.global_step + 1) % self.log_every_n_steps == 0
        now = self._now(trainer)
        if self._step_start is None:
            self._step_start = self._last_end if self._last_end is not None else now
            self._maybe_start_trace(trainer)
            if self._sampled and self._comm_timer is not None:
                self._comm_timer.start()
            if self._sampled and self._comm_bytes is not None:
                self._comm_bytes.start()
        if hasattr(trainer.strategy, "record_timeline_requested"):  # the pipeline strategy
            trainer.strategy.record_timeline_requested = self._sampled
        if self._last_end is not None:
            self._t["data"] += now - self._last_end
        try:
            samples, tokens = _batch_shape(batch)
        except ValueError as err:
            if not self._warned_batch:
                self._warned_batch = True
                warnings.warn(f"ScaleProfiler: {err}; samples/s, tokens/s, FLOPs and MFU are omitted", stacklevel=2)
            samples, tokens = 0, None
        self._samples += samples
        self._tokens_per_sample = tokens
        self._batch_start = now
        self._mark = now
        self._fwd_open = True

    def _close_forward(self, now: float) -> None:
        # Strategies that run backward inside the training step (the pipeline schedule) skip
        # Lightning's backward hooks: the whole training step then counts as forward.
        if self._fwd_open:
            self._t["forward"] += now - self._batch_start
            self._fwd_open = False
            self._mark = now

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._close_forward(self._now(trainer))

    def on_after_backward(self, trainer, pl_module) -> None:
        now = self._now(trainer)
        self._t["backward"] += now - self._mark
        self._mark = now
        self._after_backward = now

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._opt_start = self._now(trainer)
        self._close_forward(self._opt_start)
        if self._after_backward is not None:
            self._t["grad_sync"] += self._opt_start - self._after_backward
            self._after_backward = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(trainer)
        self._last_end = now
        self._close_forward(now)
        self._after_backward = None  # an accumulation micro-step: nothing to synchronise yet
        busy = getattr(trainer.strategy, "last_busy_s", None)
        if busy is not None:
            self._busy = (self._busy or 0.0) + busy
            trainer.strategy.last_busy_s = None
        opt_start = getattr(self, "_opt_start", None)
        if opt_start is None:
            return  # an accumulation micro-step: the optimizer step has not run yet
        self._opt_start = None
        self._t["optimizer"] += now - opt_start
        step = now - (self._step_start or now)
        self._t["other"] = max(0.0, step - sum(self._t[p] for p in PHASES if p != "other"))
        self._finish_step(trainer, step)
        self._reset_step()

    # -- per optimizer step ------------------------------------------------------------------------
    def _replicas(self, trainer) -> int:
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", trainer.world_size))

    def _gather(self, values: list[float], device: torch.device) -> torch.Tensor:
        """(world, len(values)) tensor of every rank's values (a collective on every rank), on the
        host. Gathered on the root ``device``: NCCL takes device tensors only."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return torch.tensor(values, dtype=torch.float64).unsqueeze(0)
        local = torch.tensor(values, dtype=torch.float64, device=device)
        out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(out, local)
        return torch.stack(out).cpu()  # a blocking read

    def _finish_step(self, trainer, step: float) -> None:
        comm = self._comm_timer.stop() if self._comm_timer is not None and self._comm_timer.active else None
        sent = self._comm_bytes.stop() if self._comm_bytes is not None and self._comm_bytes.active else None
        self._maybe_stop_trace(trainer)
        global_step = trainer.global_step
        if global_step % self.log_every_n_steps != 0:
            return
        everyone = self._gather([step, self._t["forward"]], trainer.strategy.root_device)  # the same steps on every rank
        steps, forwards = everyone[:, 0].tolist(), everyone[:, 1].tolist()
        step_max = max(steps)
        row: dict[str, float] = {"perf/step_s": step, **{f"perf/{p}_s": v for p, v in self._t.items()}}
        row.update({"perf/step_s_min": min(steps), "perf/step_s_median": statistics.median(steps),
                    "perf/step_s_max": step_max, "perf/forward_s_max": max(forwards),
                    "perf/slowest_rank": float(forwards.index(max(forwards)))})
        samples = self._samples * self._replicas(trainer)
        if samples:
            row["perf/samples_per_s"] = samples / step_max
        tokens = samples * self._tokens_per_sample if self._tokens_per_sample else None
        if tokens is not None:
            row["perf/tokens_per_s"] = tokens / step_max
            row["perf/tokens_per_s_per_device"] = tokens / step_max / trainer.world_size
        model_flops = self._model_flops(samples) if samples else None
        if model_flops is not None:
            row["perf/model_flops_per_step"] = model_flops
            extra = self._recompute_flops(trainer, samples)
            if extra is not None:
                row["perf/hardware_flops_per_step"] = model_flops + extra
            peak = self._peak(trainer)
            if peak is not None:
                row["perf/mfu"] = model_flops / step_max / (peak * trainer.world_size)
        bubble = self._bubble_fraction(trainer)
        if bubble is not None:
            row["perf/bubble_theory_s"] = self._t["forward"] * bubble
        if self._busy is not None and self._t["forward"] > 0:
            row["perf/bubble_s"] = max(0.0, self._t["forward"] - self._busy)
            row["perf/bubble_fraction"] = row["perf/bubble_s"] / self._t["forward"]
        if comm is not None:
            row["perf/comm_s"] = sum(comm.values())
            row.update({f"perf/comm_{name}_s": seconds for name, seconds in sorted(comm.items())})
            busy = self._t["forward"] + self._t["backward"] + self._t["grad_sync"] + self._t["optimizer"]
            row["perf/compute_s"] = max(0.0, busy - row["perf/comm_s"])
        if sent is not None:
            row["perf/comm_bytes"] = float(sum(sent.values()))
            row.update({f"perf/comm_bytes_{name}": float(n) for name, n in sorted(sent.items())})
        self._track_stragglers(trainer, global_step, forwards)
        self.history.append(row)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(row, step=global_step)

    def _track_stragglers(self, trainer, global_step: int, forwards: list[float]) -> None:
        """Count straggling ranks; warn (rank 0, once per rank) on a persistent one, with figures."""
        median = statistics.median(forwards)
        spread = (max(forwards) - min(forwards)) / max(median, 1e-12)
        if spread <= self.straggler_threshold:
            self._streak = (-1, 0)
            return
        slowest = forwards.index(max(forwards))
        self.straggles[slowest] = self.straggles.get(slowest, 0) + 1
        rank, run = self._streak
        self._streak = (slowest, run + 1 if rank == slowest else 1)
        if self._streak[1] < self.straggler_patience or slowest in self._warned_stragglers:
            return
        self._warned_stragglers.add(slowest)
        if trainer.is_global_zero:
            times = ", ".join(f"{t:.3f}" for t in forwards)
            warnings.warn(
                f"ScaleProfiler: rank {slowest} is a straggler: slowest forward on {self._streak[1]} logged steps in a row "
                f"(to step {global_step}), spread {spread:.0%} > straggler_threshold {self.straggler_threshold:.0%}; "
                f"forward seconds by rank at step {global_step}: [{times}], median {median:.3f} s, rank {slowest} "
                f"+{max(forwards) - median:.3f} s. Warned once for this rank; the final table counts every rank's "
                f"straggling steps", stacklevel=3)

    def _model_flops(self, samples: int) -> float | None:
        if self.flops_per_sample is not None:
            return self.flops_per_sample * samples
        cfg = getattr(self, "_gpt_config", None)
        if cfg is not None and self._tokens_per_sample:
            per_token = flops_mod.gpt_flops_per_token(cfg, self._tokens_per_sample)
            return per_token * self._tokens_per_sample * samples
        return None

    def _recompute_flops(self, trainer, samples: int) -> float | None:
        """FLOPs that full / every-k activation checkpointing of the suite's GPT adds (None when
        there is none, or when the policy's recompute cost is not a closed form: selective, classes)."""
        ac = getattr(trainer.strategy, "activation_checkpointing", None)
        cfg = self._gpt_config
        if ac is None or cfg is None or not self._tokens_per_sample or ac.policy not in ("full", "every_k"):
            return None
        blocks = cfg.n_layer if ac.policy == "full" else -(-cfg.n_layer // ac.every)
        per_token = flops_mod.gpt_recompute_flops_per_token(cfg, self._tokens_per_sample, blocks)
        return per_token * self._tokens_per_sample * samples

    def _peak(self, trainer) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        device = trainer.strategy.root_device
        allow_tf32 = dev.is_cuda(device) and torch.backends.cuda.matmul.allow_tf32
        dtype = precision_key(trainer.precision, allow_tf32)
        name = self.device or (torch.cuda.get_device_name(device) if dev.is_cuda(device) else None)
        peak = peak_flops(name, dtype) if name is not None else None
        if peak is None and not self._warned_mfu:
            self._warned_mfu = True
            if trainer.is_global_zero:
                warnings.warn(self._no_peak_message(name, device.type, dtype), stacklevel=2)
        return peak

    @staticmethod
    def _no_peak_message(name: str | None, device_type: str, dtype: str) -> str:
        """Why MFU is omitted, and the option that fixes it."""
        by_hand = f"ScaleProfiler(peak_tflops=<dense {dtype} TFLOP/s of one device>)"
        if name is None:
            return (f"ScaleProfiler: MFU is omitted: a {device_type} device has no peak-FLOPs entry. Give "
                    f"{by_hand} to report it.")
        row = lookup(name)
        if row is not None:
            return (f"ScaleProfiler: MFU is omitted: the peak-FLOPs table has no {dtype} column for {row.device} "
                    f"(device {name!r}). Give {by_hand} to report it.")
        return (f"ScaleProfiler: MFU is omitted: torch.cuda.get_device_name() reports {name!r}, which is not "
                f"in the peak-FLOPs table (exact names only). Name its row with ScaleProfiler(device=<name>), one "
                f"of {list(known_devices())}, or give {by_hand}.")

    @staticmethod
    def _bubble_fraction(trainer) -> float | None:
        runtime = getattr(trainer.strategy, "runtime", None)
        if runtime is None:
            return None
        from lightning_scale.core.pipeline import theoretical_bubble

        cfg = runtime.cfg
        return theoretical_bubble(cfg.stages, runtime.microbatches, cfg.num_virtual)

    # -- torch.profiler trace ---------------------------------------------------------------------
    def _maybe_start_trace(self, trainer) -> None:
        if self.trace_steps is None or trainer.global_rank not in self.trace_ranks or self._profiler is not None:
            return
        if trainer.global_step == self.trace_steps[0]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.is_cuda(trainer.strategy.root_device) else [])
            self._profiler = profile(activities=activities, record_shapes=False)
            self._profiler.__enter__()

    def _maybe_stop_trace(self, trainer) -> None:
        if self._profiler is None or trainer.global_step <= self.trace_steps[1]:
            return
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        folder = self._trace_folder or Path(".")
        folder.mkdir(parents=True, exist_ok=True)
        first, last = self.trace_steps
        path = folder / f"rank{trainer.global_rank}_steps{first}-{last}.json"
        prof.export_chrome_trace(str(path))
        self.trace_path = path
        self.top_ops = [(e.key, e.self_cpu_time_total / 1e3, e.count)
                        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]

    def _release_comm_timer(self) -> None:
        # Restore torch.distributed's functions in the reverse order of installation: the byte
        # counter wrapped the timer's wrappers, so it must unwrap first.
        if getattr(self, "_comm_bytes", None) is not None:
            self._comm_bytes.stop()
            self._comm_bytes.uninstall()
            self._comm_bytes = None
        if self._comm_timer is not None:
            self._comm_timer.stop()
            self._comm_timer.uninstall()
            self._comm_timer = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._release_comm_timer()

    # -- summary -------------------------------------------------------------------------------
    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        """(metric, median, min, max) rows of the final table, as strings (see :func:`summary_rows`)."""
        return summary_rows(self.history, self.straggles, self.straggler_threshold)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profiler is not None:  # training ended inside the trace window: keep what was recorded
            self.trace_steps = (self.trace_steps[0], trainer.global_step - 1)
            self._maybe_stop_trace(trainer)
        if hasattr(trainer.strategy, "record_timeline_requested"):
            trainer.strategy.record_timeline_requested = False
        self._release_comm_timer()
        if not (self.print_summary and trainer.is_global_zero and self.history):
            return
        from rich.console import Console

        Console().print(summary_table(self.history, self.straggles, self.straggler_threshold))


def summary_rows(history: list[dict[str, float]], straggles: dict[int, int],
                 threshold: float) -> list[tuple[str, str, str, str]]:
    """The final table: each metric's median, min and max over the logged steps; the slowest
    rank is a rank, not a quantity: its row counts the steps each rank straggled on."""
    rows: list[tuple[str, str, str, str]] = []
    keys = [k for k in history[0] if all(k in r for r in history)] if history else []
    for key in keys:
        if key == "perf/slowest_rank":
            continue
        values = [r[key] for r in history]
        rows.append((key, f"{statistics.median(values):.4g}", f"{min(values):.4g}", f"{max(values):.4g}"))
    if history:
        counts = ", ".join(f"rank {r}: {n}" for r, n in sorted(straggles.items())) or "none"
        rows.append((f"straggling steps (spread > {threshold:.0%})", f"{counts} of {len(history)}", "", ""))
    return rows


def summary_table(history: list[dict[str, float]], straggles: dict[int, int], threshold: float) -> Any:
    from rich.table import Table

    table = Table(title=f"ScaleProfiler: {len(history)} logged steps (phases of rank 0)")
    for name, justify in (("metric", "left"), ("median", "right"), ("min", "right"), ("max", "right")):
        table.add_column(name, justify=justify)
    for row in summary_rows(history, straggles, threshold):
        table.add_row(*row)
    return table
