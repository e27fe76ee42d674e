"""How one Lightning step drives the pipeline schedule (the inside of :class:`PipelineStrategy`'s steps).

The user's step is unchanged: ``loss = self.loss_fn(self.model(x), y)``, or a loss computed
inline. The schedule needs the whole batch, and runs forward *and* backward of every microbatch
in one call, so a training step goes like this, each line one method of :class:`PipelinedStep`:

1. :meth:`~PipelinedStep.intercept`: for the duration of Lightning's ``training_step`` hook, the
   network attribute (``self.model``, or the LightningModule's ``forward``) is a proxy and the loss
   method is the pipelined loss. ``self.model(x)`` returns a :class:`PipelineOutput` placeholder
   holding ``x``; ``self.loss_fn(output, y)`` calls :meth:`~PipelinedStep.train`.
2. :meth:`~PipelinedStep.train`: the one training call of the schedule
   (``PipelineRuntime.train_step`` -> ``schedule.step``): every microbatch's forward and backward
   on every stage; the mean microbatch loss is broadcast from the last stage, so every rank
   returns and logs the real loss. Gradients accumulate into ``.grad`` as usual.
3. Lightning then zeroes gradients (its closure runs ``optimizer_zero_grad`` between the step
   and ``backward``), so :meth:`~PipelinedStep.train` keeps them aside and the strategy's
   ``backward`` calls :meth:`~PipelinedStep.restore_gradients` instead of running a backward.
4. The strategy's ``optimizer_step`` syncs gradients (tied copies, dp) and steps;
   :meth:`~PipelinedStep.end_accumulation_window` lets the next window start from zero gradients.

A loss computed inline in ``training_step`` (no loss method) goes through
:meth:`~PipelinedStep.inline_training_step` instead of 1: the network's inputs are captured and
the last stage replays the step per microbatch as the loss
(:mod:`lightning_scale.strategies.inline_loss`). Eval steps run the schedule forward only (the
outputs exist on the last stage), predict steps broadcast them to every stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lightning_scale.strategies.interface import PipelineOutput

if TYPE_CHECKING:
    from lightning_scale.strategies.pipeline import PipelineStrategy

StepMode = Literal["train", "eval", "predict"]


def no_loss_method(output: Any, target: Any) -> Tensor:
    raise AssertionError("inline-loss steps set the runtime's loss for each step")


class _NetworkProxy:
    """Takes the network's place on the LightningModule during a step (not an nn.Module)."""

    def __init__(self, step: PipelinedStep, mode: StepMode) -> None:
        self._step = step
        self._mode = mode
        self.calls: list[PipelineOutput] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(
                f"under PipelineStrategy pass the network's inputs positionally (got keyword arguments {sorted(kwargs)})"
            )
        if self._mode == "predict" or (self._mode == "eval" and self._step.strategy.inline_loss):
            # Forward-only schedule; the outputs are sent to every rank of the pipeline, so the
            # user's step (metrics, an inline loss, logging) runs unchanged on each.
            return self._step.predict(args)
        out = PipelineOutput(args, kwargs)
        self.calls.append(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step.strategy.runtime.local_module, name)


class PipelinedStep:
    """The per-step state and actions of one :class:`PipelineStrategy` (see the module docstring)."""

    def __init__(self, strategy: PipelineStrategy) -> None:
        self.strategy = strategy
        self._stashed_grads: list[tuple[nn.Parameter, Tensor]] = []  # the schedule's gradients, until backward
        self._new_accumulation_window = True  # the next schedule run starts from zero gradients
        self._proxy: _NetworkProxy | None = None

    def restore_gradients(self) -> None:
        """Hand the schedule's gradients back (called where Lightning's backward would run)."""
        for p, grad in self._stashed_grads:
            p.grad = grad
        self._stashed_grads = []

    def end_accumulation_window(self) -> None:
        """After an optimizer step: the next schedule run starts from zero gradients."""
        self._new_accumulation_window = True

    @contextlib.contextmanager
    def intercept(self, mode: StepMode) -> Iterator[None]:
        s = self.strategy
        if not s.pipelined:
            yield
            return
        lm = s.lightning_module
        proxy = _NetworkProxy(self, mode)
        self._proxy = proxy
        outside = lm.__dict__.pop("forward", None)  # the user's forward runs in the step
        # The proxy shadows the registered submodule (or, layers on the LightningModule, its forward).
        shadowed = "forward" if s.network_is_module else s.module_name
        lm.__dict__[shadowed] = proxy
        lm.__dict__[s.loss_name] = self._make_loss(mode)
        try:
            yield
        finally:
            lm.__dict__.pop(shadowed, None)
            lm.__dict__.pop(s.loss_name, None)
            if outside is not None:
                lm.__dict__["forward"] = outside
            self._proxy = None
        unused = [c for c in proxy.calls if not c.consumed]
        if unused:
            call = "self(...)" if s.network_is_module else f"self.{s.module_name}(...)"
            raise RuntimeError(
                f"{type(lm).__name__} called {call} in its {mode} step but never passed the "
                f"output to self.{s.loss_name}(output, target); under PipelineStrategy the schedule runs inside "
                f"the loss method, so every network call must go through it"
            )

    def _make_loss(self, mode: StepMode):
        s = self.strategy
        runtime = s.runtime
        assert runtime is not None

        def pipelined_loss(output: Any, target: Any, *args: Any, **kwargs: Any) -> Tensor:
            if not isinstance(output, PipelineOutput):
                return runtime.loss_fn(output, target, *args, **kwargs)
            if args or kwargs:
                raise TypeError(f"under PipelineStrategy {s.loss_name} takes exactly (output, target)")
            output.consumed = True
            batch = self.batch_size(output.args, target)
            if mode == "train":
                return self.train(output.args, target, batch)
            s._check_forward_only()
            with self.explained_stage_errors():
                value, loss = runtime.eval_step(output.args, target, batch)
            output.value = value
            return loss

        return pipelined_loss

    def train(self, inputs: tuple, target: Any, batch: int) -> Tensor:
        """The training step proper: forward and backward of every microbatch through the schedule
        (``PipelineRuntime.train_step`` -> ``schedule.step``), gradients kept aside for
        :meth:`restore_gradients`; returns the mean microbatch loss on every rank of the pipeline."""
        s = self.strategy
        runtime = s.runtime
        assert runtime is not None
        runtime.check_batch(batch)
        png = s.timeline_step is not None and s.lightning_module.trainer.global_step == s.timeline_step
        record = png or s.record_timeline_requested
        runtime.record_timeline = record
        accumulate = s.lightning_module.trainer.accumulate_grad_batches
        params = [p for p in s.lightning_module.parameters() if p.requires_grad]
        if self._new_accumulation_window:
            for p in params:
                p.grad = None
            self._new_accumulation_window = False
        with self.explained_stage_errors():
            loss = runtime.train_step(inputs, target, grad_divisor=accumulate)
        # Lightning zeroes gradients after the step's forward and before backward (its
        # closure order); the schedule has already run backward, so keep its gradients
        # aside and hand them back in restore_gradients() (the strategy's backward).
        self._stashed_grads = [(p, p.grad) for p in params if p.grad is not None]
        for p, _ in self._stashed_grads:
            p.grad = None
        # Busy time of this rank's compute actions (seconds), for ScaleProfiler's bubble.
        s.last_busy_s = sum(e.end - e.start for e in runtime.timeline) if record else None
        if record:
            runtime.record_timeline = False
        if png:
            s._save_timeline()
        return loss

    def inline_training_step(self, args: tuple, kwargs: dict) -> Tensor:
        """``training_step`` with its loss computed inline (see :mod:`.inline_loss`): capture the
        network's inputs, run the schedule with the step replayed per microbatch on the last
        stage as the loss, then log the microbatch-averaged values once on every rank."""
        s = self.strategy
        from lightning_scale.strategies import inline_loss as il

        lm = s.lightning_module
        runtime = s.runtime
        assert runtime is not None
        attr = "forward" if s.network_is_module else s.module_name
        call = "self(...)" if s.network_is_module else f"self.{s.module_name}(...)"
        step = type(lm).training_step.__get__(lm)
        outside = lm.__dict__.pop("forward", None)  # the user's forward, if the step calls it
        problems: list[str] = []  # contract violations seen by the last stage's replays
        try:
            with il.forked_rng(s.root_device):  # the capture does not move the run's random streams
                inputs = il.capture_network_inputs(lm, attr, call, step, args, kwargs)
            batch_size = il.batch_size_of(inputs)
            batch, rest = args[0], args[1:]
            il.check_batch_rows(batch, batch_size, f"PipelineStrategy ({type(lm).__name__})")  # every rank, before p2p
            recorder = il.LogRecorder()

            def loss_of_microbatch(output: Any, rows: Tensor) -> Tensor:
                # An error here would leave the other stages waiting in their receives: keep the
                # schedule going with a zero loss, and raise on every rank once it is over.
                if not problems:
                    try:
                        with il.forked_rng(s.root_device):
                            return il.replay_loss(lm, attr, call, step, batch, rest, kwargs, output, rows, batch_size,
                                                  recorder, inputs)
                    except Exception as err:  # noqa: BLE001 - any error of the user's step, re-raised below
                        problems.append(str(err) if isinstance(err, il.StepError) else f"{type(err).__name__}: {err}")
                tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, Tensor)]
                return sum(t.sum() * 0 for t in tensors)

            runtime.loss_fn = loss_of_microbatch
            rows = torch.arange(batch_size, device=s.root_device)  # cut like the inputs: each microbatch's rows
            loss = self.train(inputs, rows, batch_size)
        finally:
            runtime.loss_fn = no_loss_method
            if outside is not None:
                lm.__dict__["forward"] = outside
        if runtime.has_last_stage and not problems and recorder.inputs_differ():
            problems.append(il._changed_inputs(type(lm).__name__, call))
        outcome = (problems[0] if problems else None, recorder.merged()) if runtime.has_last_stage else None
        problem, logged = runtime.broadcast_from_last_stage(outcome)
        if problem is not None:
            self._stashed_grads = []
            raise il.StepError(f"{type(lm).__name__}.training_step under PipelineStrategy (last stage): {problem}")
        for name, (value, options) in logged.items():
            lm.log(name, torch.tensor(value, device=s.root_device), **options)
        return loss

    def predict(self, args: tuple) -> Any:
        s = self.strategy
        s._check_forward_only()
        runtime = s.runtime
        assert runtime is not None
        out = runtime.predict_step(args, self.batch_size(args, None))
        return runtime.broadcast_from_last_stage(out)

    @contextlib.contextmanager
    def explained_stage_errors(self) -> Iterator[None]:
        """A stage view's forward that calls a module the stage does not own fails inside torch's
        schedule with a bare TypeError; say what it means and what to do."""
        s = self.strategy
        try:
            yield
        except TypeError as err:
            if getattr(s, "_frontend", None) != "views" or "'NoneType' object is not callable" not in str(err):
                raise
            raise TypeError(
                f"PipelineStrategy(frontend='views'): {type(s.runtime.local_module).__name__}.forward calls a module "
                f"this pipeline stage does not own (stage views set those to None) ({err}). Use frontend='trace', which "
                f"splits an unchanged forward, or make the forward skip None modules "
                f"(`if self.embed is not None: x = self.embed(x)`)"
            ) from err

    @staticmethod
    def batch_size(args: tuple, target: Any) -> int:
        for t in (*args, target):
            if isinstance(t, Tensor):
                return t.shape[0]
        raise TypeError("PipelineStrategy needs tensor inputs or targets to cut the batch into microbatches")
