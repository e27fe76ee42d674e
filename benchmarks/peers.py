"""The suite's strategies next to their peers, in one run, on this machine: Lightning's ``ddp``
and ``ModelParallelStrategy`` (FSDP2, TP), fairscale (OSS + ShardedDataParallel, Pipe).

Usage (from the repository root)::

    python benchmarks/peers.py                 # GPT nano, every variant, 3 repeats
    python benchmarks/peers.py --quick         # smoke configuration (tiny, 1 repeat, 2 steps)
    python benchmarks/peers.py --variants lightning_ddp zero2 lightning_fsdp2 --repeats 5

Every variant is a ``Trainer.fit`` of the suite's ``LanguageModelingTask`` (GPT ``--preset``,
fp32 AdamW at a constant learning rate, dropout 0) on gloo processes with 1 thread each, started
by ``lightning_scale.testing.multiprocess.run_distributed``. Same model (``torch.manual_seed(0)``
before it is built), same data (``--batch`` random sequences of ``--seq`` tokens per optimizer
step, seed 1, the same sequences in every variant's step) and same number of steps:

=====================  ======  ====================================================================
variant                ranks   what runs
=====================  ======  ====================================================================
``lightning_ddp``      2       Lightning ``strategy="ddp"`` (torch DDP): **the baseline**
``pipeline_1f1b``      2       suite ``PipelineStrategy(schedule="1f1b")``, pp = 2, m microbatches
``tensor_parallel``    2       suite ``TensorParallelStrategy()``, tp = 2 (its built-in GPT plan)
``zero2``              2       suite ``ZeroStrategy(stage=2)`` (own bucketed engine)
``zero3``              2       suite ``ZeroStrategy(stage=3)`` (FSDP2 underneath)
``parallel_3d``        4       suite ``Parallel3DStrategy()``, pp = 2 x tp = 2 (4 ranks on 2 cores:
                               oversubscribed, so its time is not comparable; its bytes are)
``lightning_fsdp2``    2       Lightning ``ModelParallelStrategy(data_parallel_size=2)``,
                               ``fully_shard`` per block and on the network in ``configure_model``
``lightning_tp``       2       Lightning ``ModelParallelStrategy(tensor_parallel_size=2)``, torch's
                               ``parallelize_module`` with a Megatron column/row plan written here
``fairscale_oss_sdp``  2       fairscale ``OSS`` + ``ShardedDataParallel``, wrapped by the small
                               strategy below (what Lightning 1.x offered as ``ddp_sharded``)
``fairscale_pipe``     1       fairscale ``Pipe`` (GPipe), 2 partitions in **one** process on CPU,
                               m microbatches, no checkpointing; single-device Lightning
=====================  ======  ====================================================================

Per run, on every rank: step time = ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
backward, communication, optimizer step), mean over ``--steps`` steps after ``--warmup``, max
over ranks; tokens/s = ``--batch`` x ``--seq`` / step time. Memory: a
:class:`~lightning_scale.callbacks.MemoryAccountant` on step 1 (a warm-up step, so its meters do
not touch the timed steps): exact bytes of parameters + gradients + optimizer state per rank, the
activations the forward leaves for the backward (``HeldActivationMeter``), and the memory
planner's prediction where it models the run. Pipelines (suite and fairscale) run forward and
backward inside one call, so no forward hook can isolate their activations: not measured (``-``).

Each figure is the median over ``--repeats`` (min-max); repeats loop over all variants, and the
ratios to ``lightning_ddp`` are taken within a repeat, so a change of machine load hits both.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/peers.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common as common  # noqa: E402

BASELINE = "lightning_ddp"
#: variant -> (ranks, data-parallel size, origin, description)
VARIANTS: dict[str, tuple[int, int, str, str]] = {
    "lightning_ddp": (2, 2, "Lightning", "ddp (torch DDP), dp=2"),
    "pipeline_1f1b": (2, 1, "suite", "PipelineStrategy 1f1b, pp=2"),
    "tensor_parallel": (2, 1, "suite", "TensorParallelStrategy, tp=2"),
    "zero2": (2, 2, "suite", "ZeroStrategy stage 2, dp=2"),
    "zero3": (2, 2, "suite", "ZeroStrategy stage 3 (FSDP2), dp=2"),
    "parallel_3d": (4, 1, "suite", "Parallel3DStrategy pp=2 x tp=2 (4 ranks on 2 cores)"),
    "lightning_fsdp2": (2, 2, "Lightning", "ModelParallelStrategy, FSDP2 dp=2"),
    "lightning_tp": (2, 1, "Lightning", "ModelParallelStrategy, TP tp=2"),
    "fairscale_oss_sdp": (2, 2, "fairscale", "OSS + ShardedDataParallel, dp=2"),
    "fairscale_pipe": (1, 1, "fairscale", "Pipe (GPipe), 2 partitions, 1 process"),
}
#: why a variant's activations are not measured
NOT_MEASURED = {
    "pipeline_1f1b": "pipeline schedule: forward and backward run inside one call",
    "parallel_3d": "pipeline schedule: forward and backward run inside one call",
    "fairscale_pipe": "fairscale Pipe computes in worker threads, which the (thread-local) meter does not see",
}
FULL_DEFAULTS = dict(preset="nano", variants=list(VARIANTS), batch=16, seq=128, microbatches=4, steps=6, warmup=2,
                     repeats=3, json="benchmarks/results/peers.json", retries=3)
QUICK_DEFAULTS = dict(preset="tiny", variants=list(VARIANTS), batch=8, seq=32, microbatches=4, steps=2, warmup=2,
                      repeats=1, json="benchmarks/results/peers_quick.json", retries=0)
SAMPLE_STEP = 1  # MemoryAccountant's step: the first with optimizer state, inside the warm-up


# ----------------------------------------------------------------------------------------------
# Peers that Lightning 2.x does not ship: fairscale's sharded DDP and Pipe, as small adapters
# ----------------------------------------------------------------------------------------------
def _fairscale_sharded_strategy() -> Any:
    """A Lightning ``DDPStrategy`` that wraps the optimizers in ``fairscale.optim.OSS`` and the
    module in ``fairscale.nn.ShardedDataParallel`` (the layout of Lightning 1.x's ``ddp_sharded``)."""
    import inspect

    from fairscale.nn.data_parallel import ShardedDataParallel
    from fairscale.optim import OSS
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn

    class FairscaleShardedStrategy(DDPStrategy):
        def configure_ddp(self) -> None:
            pass  # ShardedDataParallel needs the OSS optimizers: wrapped in setup_optimizers

        def setup_optimizers(self, trainer: Any) -> None:
            super().setup_optimizers(trainer)
            if trainer.state.fn != TrainerFn.FITTING:
                return
            wrapped = []
            for opt in self.optimizers:
                accepted = inspect.signature(type(opt).__init__).parameters
                options = {k: v for k, v in opt.defaults.items() if k in accepted}
                oss = OSS(opt.param_groups, optim=type(opt), **options)
                for config in self.lr_scheduler_configs:
                    if config.scheduler.optimizer is opt:
                        config.scheduler.optimizer = oss
                wrapped.append(oss)
            self.optimizers = wrapped
            self.model = ShardedDataParallel(self.model, sharded_optimizer=wrapped)

        def teardown(self) -> None:
            if isinstance(self.model, ShardedDataParallel):
                self.model = self.lightning_module
            super().teardown()

    return FairscaleShardedStrategy()


def _task_class(variant: str, microbatches: int) -> type:
    """The LightningModule of a variant: the suite's task, plus the peer's model hook where it needs one."""
    from torch import nn

    from lightning_scale.tasks import LanguageModelingTask

    if variant == "lightning_fsdp2":
        return common.fsdp2_task_class()
    if variant == "lightning_tp":
        class TPTask(LanguageModelingTask):
            def configure_model(self) -> None:
                from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

                # Megatron's split, in torch's own API: q, k, v and the MLP's first linear by output
                # features (whole heads per rank), the attention and MLP output projections by input
                # features (one all-reduce each); embeddings, norms and the tied head replicated.
                plan: dict[str, Any] = {}
                for name in self.model.blocks:
                    for proj in ("q_proj", "k_proj", "v_proj"):
                        plan[f"blocks.{name}.attn.{proj}"] = ColwiseParallel()
                    plan[f"blocks.{name}.attn.out_proj"] = RowwiseParallel()
                    plan[f"blocks.{name}.mlp.up_proj"] = ColwiseParallel()
                    plan[f"blocks.{name}.mlp.down_proj"] = RowwiseParallel()
                parallelize_module(self.model, self.device_mesh["tensor_parallel"], plan)

        return TPTask
    if variant == "fairscale_oss_sdp":
        class ShardedTask(LanguageModelingTask):
            def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
                # ShardedDataParallel reduces into gradient buffers it set up once; torch's default
                # zero_grad(set_to_none=True) drops them, and fairscale 0.4.13 then trains wrongly
                # from the third step on gloo (see lightning_scale/core/sharding_fairscale.py).
                optimizer.zero_grad(set_to_none=False)

        return ShardedTask
    if variant == "fairscale_pipe":
        class _Embed(nn.Module):
            def __init__(self, gpt: nn.Module) -> None:
                super().__init__()
                self.tok_emb, self.pos_emb, self.drop = gpt.tok_emb, gpt.pos_emb, gpt.drop

            def forward(self, idx: torch.Tensor) -> torch.Tensor:
                pos = torch.arange(idx.shape[1], device=idx.device)
                return self.drop(self.tok_emb(idx) + self.pos_emb(pos))

        class _Head(nn.Module):
            def __init__(self, gpt: nn.Module) -> None:
                super().__init__()
                self.ln_f, self.head = gpt.ln_f, gpt.head

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.ln_f(x))

        class PipeTask(LanguageModelingTask):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                from fairscale.nn import Pipe

                gpt = self.model
                blocks = list(gpt.blocks.values())
                layers = nn.Sequential(_Embed(gpt), *blocks, _Head(gpt))
                first = 1 + len(blocks) // 2  # embeddings + the first half of the blocks | the rest + head
                # devices: both partitions on the CPU (fairscale's default is one CUDA device each).
                self.model = Pipe(layers, balance=[first, len(layers) - first], devices=["cpu", "cpu"],
                                  chunks=microbatches, checkpoint="never")

        return PipeTask
    return LanguageModelingTask


def _strategy(variant: str, microbatches: int) -> Any:
    if variant == "lightning_ddp":
        return "ddp"
    if variant == "fairscale_pipe":
        return "auto"
    if variant == "fairscale_oss_sdp":
        return _fairscale_sharded_strategy()
    if variant in ("lightning_fsdp2", "lightning_tp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp, tp = (2, 1) if variant == "lightning_fsdp2" else (1, 2)
        return ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)
    from lightning_scale.strategies import Parallel3DStrategy, PipelineStrategy, TensorParallelStrategy, ZeroStrategy

    if variant == "pipeline_1f1b":
        return PipelineStrategy(stages=2, schedule="1f1b", microbatches=microbatches)
    if variant == "tensor_parallel":
        return TensorParallelStrategy(tensor_parallel_size=2)
    if variant == "parallel_3d":
        return Parallel3DStrategy(pipeline_parallel_size=2, tensor_parallel_size=2, schedule="1f1b",
                                  microbatches=microbatches)
    if variant in ("zero2", "zero3"):
        return ZeroStrategy(stage=int(variant[-1]))
    raise ValueError(f"unknown variant {variant!r}")


# ----------------------------------------------------------------------------------------------
# Rank function (module level: the harness pickles it by reference)
# ----------------------------------------------------------------------------------------------
def peer_worker(variant: str, preset: str, layers: int | None, batch: int, seq: int, microbatches: int, warmup: int,
                steps: int) -> dict:
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks._common import Window
    from lightning_scale.callbacks import MemoryAccountant
    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.models import GPTConfig

    world, dp, _, _ = VARIANTS[variant]
    cfg = GPTConfig.from_preset(preset)
    cfg = GPTConfig(**{**cfg.to_dict(), "block_size": max(cfg.block_size, seq), "dropout": 0.0,
                       "n_layer": layers or cfg.n_layer})
    out: dict[str, Any] = {"step_s": [], "losses": []}
    window = Window()

    class Measure(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                if dist.is_available() and dist.is_initialized():
                    dist.barrier()
                window.start()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = time.perf_counter() - self.t0
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            out["losses"].append(float(loss))
            if batch_idx >= warmup:
                out["step_s"].append(t)
            if batch_idx == warmup + steps - 1:
                out["window"] = window.stop()
                strategy = trainer.strategy
                engine = strategy.engine() if callable(getattr(strategy, "engine", None)) else None
                out["psi_padded"] = engine.padded_numel() if engine is not None else None
                out["buckets"] = len(engine.specs) if engine is not None else None
                out["dp_rank"], out["dp_size"], out["rank"] = dp_rank, dp, trainer.global_rank

    torch.manual_seed(0)
    task = _task_class(variant, microbatches)(
        model=cfg, optim=OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0), sample_tokens=0)
    shapes = [tuple(p.shape) for p in {id(p): p for p in task.parameters()}.values()]
    out["psi"] = sum(math.prod(s) for s in shapes)
    out["psi_fsdp"] = sum(math.ceil(s[0] / dp) * dp * math.prod(s[1:]) for s in shapes)
    out["n_params"] = len(shapes)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch * (warmup + steps), seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch * (warmup + steps), seq), generator=g)
    # Step i's global batch is sequences [i * batch, (i + 1) * batch) in every variant: data-parallel
    # rank r takes every dp-th of them from r on (the ranks of one replica take the same ones). The
    # ranks' data is dealt here, not by Lightning's distributed sampler (use_distributed_sampler=False),
    # so the single-process variant sees the very same batches.
    dp_rank = int(os.environ.get("RANK", "0")) % dp
    data = DataLoader(TensorDataset(x[dp_rank::dp], y[dp_rank::dp]), batch_size=batch // dp, drop_last=True)
    accountant = MemoryAccountant(sample_step=SAMPLE_STEP, log=False, print_table=False, plot=False, oom_dump=False)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=_strategy(variant, microbatches),
                        max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[Measure(), accountant])
    trainer.fit(task, data)
    record = dict(accountant.record or {})
    if variant in NOT_MEASURED:
        record["activations"] = None
        record["activations_note"] = NOT_MEASURED[variant]
    out["memory"] = {k: record.get(k) for k in ("params", "grads", "optimizer", "activations", "ddp_buckets",
                                                  "predicted", "activations_note", "by_device")}
    out["threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="GPT preset (default nano; --quick: tiny)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   help=f"what to run (default: all; {BASELINE} always runs)")
    p.add_argument("--layers", type=int, help="override the preset's number of blocks (even, >= 2: 2 pipeline stages)")
    p.add_argument("--microbatches", type=int, help="microbatches of the pipelines (default 4)")
    common.add_run_arguments(p, FULL_DEFAULTS, "global sequences per optimizer step (split over the dp ranks)",
                             "tiny, every variant, 1 repeat, 2 steps")
    common.add_load_arguments(p)
    args = p.parse_args(argv)
    common.apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    common.check_run_arguments(p, args, min_warmup=SAMPLE_STEP + 1)
    args.variants = [BASELINE] + [v for v in dict.fromkeys(args.variants) if v != BASELINE]
    if args.batch % (2 * args.microbatches) and any(v in args.variants for v in NOT_MEASURED):
        p.error(f"--batch {args.batch} must be a multiple of 2 x --microbatches ({2 * args.microbatches})")
    if args.batch % 2:
        p.error("--batch must be even (split over 2 data-parallel ranks)")
    if args.layers is not None and (args.layers < 2 or args.layers % 2):
        p.error("--layers must be even and >= 2 (the pipelines split the blocks over 2 stages)")
    return args


def _global_losses(results: list[dict]) -> list[float]:
    """The global batch's loss per step: the mean over data-parallel ranks (one rank per dp index)."""
    by_dp: dict[int, list[float]] = {}
    for r in results:
        by_dp.setdefault(r["dp_rank"], r["losses"])
    return [statistics.mean(values) for values in zip(*by_dp.values())]


def summarise(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    rows = []
    tokens = args.batch * args.seq
    base_mem = None
    base_runs = [r for r in runs if r["variant"] == BASELINE]
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        first = mine[0]["results"]
        mem = [r["memory"] for r in first]
        states = [m["params"] + m["grads"] + m["optimizer"] for m in mem]
        acts = [m["activations"] for m in mem]
        act_max = max(acts) if all(a is not None for a in acts) else None
        row: dict[str, Any] = {
            "variant": variant, "origin": VARIANTS[variant][2], "layout": VARIANTS[variant][3],
            "ranks": VARIANTS[variant][0],
            "step_s": common.stats([r["step_s"] for r in mine]),
            "tokens_per_s": common.stats([tokens / r["step_s"] for r in mine]),
            "step_vs_ddp": common.paired_ratio(mine, base_runs),
            "tokens_per_s_vs_ddp": common.paired_ratio(base_runs, mine),  # t(ddp) / t(variant), per repeat
            "model_states_bytes_per_rank": states, "model_states_bytes_max": max(states),
            "model_state_parts_rank0": {k: mem[0][k] for k in ("params", "grads", "optimizer")},
            "ddp_buckets_bytes": mem[0]["ddp_buckets"],
            "activation_bytes_per_rank": acts, "activation_bytes_max": act_max,
            "activations_note": next((m["activations_note"] for m in mem if m.get("activations_note")), None),
            "predicted_per_rank": [m["predicted"] for m in mem],
            "losses": _global_losses(first),
            "psi": first[0]["psi"], "psi_fsdp": first[0]["psi_fsdp"], "n_params": first[0]["n_params"],
            "psi_padded": first[0]["psi_padded"], "buckets": first[0]["buckets"],
            "bytes_same_every_repeat": all([sum(x["memory"][k] for k in ("params", "grads", "optimizer"))
                                            for x in r["results"]] == states for r in mine),
            "polluted_runs": sum(r["polluted"] for r in mine),
        }
        if variant == BASELINE:
            base_mem = row
        assert base_mem is not None
        row["model_states_vs_ddp"] = row["model_states_bytes_max"] / base_mem["model_states_bytes_max"]
        base_act = base_mem["activation_bytes_max"]
        row["activations_vs_ddp"] = act_max / base_act if act_max is not None and base_act else None
        row["final_loss_minus_ddp"] = row["losses"][-1] - base_mem["losses"][-1]
        rows.append(row)
    return rows


def planner_rows(rows: list[dict]) -> list[dict]:
    """Predicted vs measured bytes per rank, for the variants the planner models."""
    out = []
    for row in rows:
        for rank, pred in enumerate(row["predicted_per_rank"]):
            if not pred:
                continue
            measured_states = row["model_states_bytes_per_rank"][rank]
            predicted_states = pred["params"] + pred["grads"] + pred["optimizer"]
            act = row["activation_bytes_per_rank"][rank]
            out.append({"source": "peers", "variant": row["variant"], "rank": rank,
                        "model_states_measured": measured_states, "model_states_predicted": predicted_states,
                        "model_states_exact": measured_states == predicted_states,
                        "activations_measured": act, "activations_predicted": pred["activations"],
                        "activations_ratio": pred["activations"] / act if act else None})
    return out


def _fmt_ratio(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "-"
    text = f"{s['median']:.{digits}f}x"
    return text + (f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})" if s["n"] > 1 else "")


def _fmt_abs(s: dict, scale: float, digits: int = 0) -> str:
    text = f"{scale * s['median']:,.{digits}f}"
    return text + (f" ({scale * s['min']:,.{digits}f}-{scale * s['max']:,.{digits}f})" if s["n"] > 1 else "")


HEADERS = ["variant", "from", "layout", "step time vs ddp", "tokens/s vs ddp", "model states MiB/rank", "vs ddp",
           "activations MiB/rank", "vs ddp", "last loss - ddp"]
DETAIL_HEADERS = ["variant", "ranks", "step ms", "tokens/s", "params / grads / optimizer MiB (rank 0)", "polluted runs"]


def cells(row: dict) -> list[str]:
    mib = 2**20
    act = "-" if row["activation_bytes_max"] is None else f"{row['activation_bytes_max'] / mib:.2f}"
    return [row["variant"], row["origin"], row["layout"], _fmt_ratio(row["step_vs_ddp"]),
            _fmt_ratio(row["tokens_per_s_vs_ddp"]), f"{row['model_states_bytes_max'] / mib:.2f}",
            f"{row['model_states_vs_ddp']:.2f}x", act,
            "-" if row["activations_vs_ddp"] is None else f"{row['activations_vs_ddp']:.2f}x",
            f"{row['final_loss_minus_ddp']:+.1e}"]


def detail_cells(row: dict) -> list[str]:
    parts = row["model_state_parts_rank0"]
    return [row["variant"], str(row["ranks"]), _fmt_abs(row["step_s"], 1e3), _fmt_abs(row["tokens_per_s"], 1.0),
            " / ".join(f"{parts[k] / 2**20:.2f}" for k in ("params", "grads", "optimizer")), str(row["polluted_runs"])]


def caption(args: argparse.Namespace) -> str:
    layers = f" with {args.layers} blocks" if args.layers else ""
    return (f"GPT {args.preset}{layers}, {args.batch} x {args.seq} tokens per optimizer step (global), fp32 AdamW, "
            f"pipelines m = {args.microbatches}; gloo, 1 thread per rank; {args.warmup} warm-up + {args.steps} timed "
            f"steps; median of {args.repeats} repeats (min-max) of the per-repeat ratio to lightning_ddp. Bytes are "
            f"exact tensor counts (MemoryAccountant, step {SAMPLE_STEP}) of the largest rank; activations: what the "
            f"forward leaves for the backward (- = not measurable, see notes).")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from rich.table import Table

    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = common.start(args)
    console.print(f"[bold]peers benchmark[/] preset={args.preset} variants={args.variants} batch={args.batch} "
                  f"seq={args.seq} m={args.microbatches} steps={args.steps} repeats={args.repeats}; load {env['load_before']}")
    runs: list[dict] = []
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for variant in args.variants:
            t0 = time.perf_counter()
            label = f"[{rep}] {variant}"
            meas = common.measure(args, console, label, lambda: mp_harness.run_distributed(
                peer_worker, VARIANTS[variant][0], variant, args.preset, args.layers, args.batch, args.seq, args.microbatches,
                args.warmup, args.steps, init_process_group=False, timeout=args.timeout))
            res = meas.pop("results")
            step = max(statistics.mean(r["step_s"]) for r in res)
            runs.append({"variant": variant, "repeat": rep, "step_s": step, **meas, "results": res})
            console.print(f"  {label:<24} {1e3 * step:8.0f} ms/step (others {meas['foreign_cores']:.2f} cores; "
                          f"{time.perf_counter() - t0:.0f} s)")
    env["wall_s"] = time.perf_counter() - t_start
    env["reruns"] = sum(len(r["attempts_foreign_cores"]) - 1 for r in runs)
    env["load_after"] = common.loadavg()
    rows = summarise(args, runs)
    planner = planner_rows(rows)

    detail = Table(title="Absolute figures (this machine, noisy; compare the ratios)")
    for h in DETAIL_HEADERS:
        detail.add_column(h, justify="right")
    for row in rows:
        detail.add_row(*detail_cells(row))
    console.print(detail)
    notes = sorted({f"{r['variant']}: activations not measured ({r['activations_note']})" for r in rows
                    if r["activation_bytes_max"] is None})
    buckets = [r for r in rows if r["ddp_buckets_bytes"]]
    notes += [f"{r['variant']}: torch DDP also keeps {r['ddp_buckets_bytes'] / 2**20:.2f} MiB of gradient buckets per "
              f"rank (not in the model-state column)" for r in buckets]
    if "parallel_3d" in args.variants:
        notes.append("parallel_3d runs 4 ranks on this machine's 2 cores: its time is not comparable with the 2-rank rows")
    if "fairscale_pipe" in args.variants:
        notes.append("fairscale_pipe is one process (its 2 partitions share one worker thread on the CPU device)")
    payload = {"config": vars(args), "environment": env, "summary": rows, "planner": planner, "notes": notes,
               "runs": runs}
    common.write_outputs(console, json_path, f"Peers: ratios to Lightning ddp (median of {args.repeats})", HEADERS,
                         [cells(r) for r in rows], caption(args) + " Notes: " + "; ".join(notes) + ".", payload, env)
    for note in notes:
        console.print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
