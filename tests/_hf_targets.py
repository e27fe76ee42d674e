"""A Hugging Face Llama (built from a config, no weights downloaded) trained with PipelineStrategy."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, attn_implementation="sdpa", tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 64, (64, 12), generator=g)
    return TensorDataset(x, torch.roll(x, -1, 1))


def _loss(output, target):
    logits = output.logits if hasattr(output, "logits") else output  # HF output object or stage logits
    if logits.dim() == 2:  # a classifier: (B, classes) against (B,)
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


# -- other families (issue 26): tiny configs, dropout off, built under one seed ---------------------
def _family_model(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=4, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg)
    if family == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           image_size=8, patch_size=4, num_channels=3, num_labels=4, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        return tf.ViTForImageClassification(cfg)
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, num_labels=4, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
        return tf.BertForSequenceClassification(cfg)
    if family == "bert_mlm":  # the masked-LM head, its decoder tied to the word embeddings
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return tf.BertForMaskedLM(cfg)
    if family == "bert_clm":  # BERT as a causal LM (is_decoder: causal mask), eager attention: the mask is used
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, is_decoder=True, attn_implementation="eager")
        return tf.BertLMHeadModel(cfg)
    if family == "gpt_neox":  # Pythia-style: partial rotary, parallel residual
        cfg = tf.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                               tie_word_embeddings=False)
        return tf.GPTNeoXForCausalLM(cfg)
    if family == "gptj":
        cfg = tf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=4, n_head=2, rotary_dim=8, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPTJForCausalLM(cfg)
    raise ValueError(family)


def _family_data(family: str):
    g = torch.Generator().manual_seed(5)
    if family in ("gpt2", "bert_mlm", "bert_clm", "gpt_neox", "gptj"):  # next-token targets (masked-LM: any token targets train the same head)
        x = torch.randint(0, 64, (64, 12), generator=g)
        return TensorDataset(x, torch.roll(x, -1, 1))
    if family == "vit":
        return TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return TensorDataset(torch.randint(0, 64, (64, 12), generator=g), torch.randint(0, 4, (64,), generator=g))


def _fit(strategy, steps: int, devices: int = 2, family: str = "llama", save_to: str | None = None,
         resume_from: str | None = None, checkpoint_dir: str | None = None):
    """Train the model (the Llama, or a ``family`` of :func:`_family_model`) with ``strategy`` on
    ``devices`` ranks; returns the task and this rank's per-step losses. ``checkpoint_dir``: a
    checkpoint at the end of every epoch (``epoch=<n>.ckpt``, Lightning's ModelCheckpoint)."""
    import lightning as L

    class HFTask(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model() if family == "llama" else _family_model(family)

        def loss_fn(self, output, target):  # the loss method PipelineStrategy runs on the last stage
            return _loss(output, target)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    os.environ["PL_GLOBAL_SEED"] = "0"
    callbacks = [Record()]
    if checkpoint_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False)
    task = HFTask()
    data = _data() if family == "llama" else _family_data(family)
    trainer.fit(task, DataLoader(data, batch_size=8, drop_last=True), ckpt_path=resume_from)
    if save_to is not None:  # the strategy's own checkpoint (every rank takes part)
        trainer.save_checkpoint(save_to)
    return task, losses


def zero_true_gradient(name: str) -> bool:
    """An attention key bias adds the same q.b_k to every score of a query, which softmax
    cancels: its true gradient is 0, so what it gets is rounding noise that Adam scales to
    lr-sized steps in either direction. Its values are not compared (the losses are)."""
    return name.endswith(("k_proj.bias", "key.bias"))


def assert_matches(results: list[dict], ref: dict, steps: int, exclude=lambda name: False) -> None:
    """Rank 0's per-step losses within 1e-5 (relative) of the one-process reference's, and every
    rank's gathered weights together within 1e-5 of its (names for which ``exclude`` is true are
    not compared)."""
    assert len(results[0]["losses"]) == len(ref["losses"]) == steps
    for a, b in zip(results[0]["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    held = {}
    for r in results:
        held.update(r["state"])
    assert set(held) == set(ref["state"])
    for name, value in held.items():
        if not exclude(name):
            assert (value - ref["state"][name]).abs().max().item() <= 1e-5, name


def _full_state(task) -> dict:
    from torch.distributed.tensor import DTensor

    # DTensor (tensor-parallel) weights are gathered to full tensors: a collective, same order on every rank.
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in task.state_dict().items()}


def fit_hf(steps: int) -> dict:
    """2 pipeline stages split before layer 2, with the Hugging Face decoder adapter."""
    from lightning_scale.strategies import PipelineStrategy

    strategy = PipelineStrategy(stages=2, microbatches=4, split_points=["model.layers.2"],
                                stage_forward="lightning_scale.adapters.huggingface.decoder_stage_forward")
    task, losses = _fit(strategy, steps)
    return {"losses": losses, "state": _full_state(task)}


def fit_family_pipeline(family: str, steps: int, zero_stage: int = 0, devices: int = 2,
                        save_to: str | None = None) -> dict:
    """2 pipeline stages, no stage_forward given: the strategy picks the family's own."""
    from lightning_scale.strategies import PipelineStrategy

    task, losses = _fit(PipelineStrategy(stages=2, microbatches=4, zero_stage=zero_stage), steps, devices=devices,
                        family=family, save_to=save_to)
    return {"losses": losses, "state": _full_state(task)}


def fit_hf_3d(steps: int) -> dict:
    """pp=2 x tp=2 on 4 ranks: the decoder stage forward picked from the model, TP from the
    model's own plan on each stage; nothing model-specific given."""
    from lightning_scale.strategies import Parallel3DStrategy

    task, losses = _fit(Parallel3DStrategy(pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=4), steps,
                        devices=4)
    return {"losses": losses, "state": _full_state(task)}


def fit_family_zero3(family: str, steps: int) -> dict:
    from lightning_scale.strategies import ZeroStrategy

    task, losses = _fit(ZeroStrategy(stage=3), steps, devices=2, family=family)
    return {"losses": losses, "state": _full_state(task)}


def reference_hf(steps: int, microbatches: int = 4, replicas: int = 1, family: str = "llama") -> dict:
    """One process: the same batches (Lightning's DistributedSampler order, each of ``replicas``
    data-parallel replicas' share), ``microbatches`` accumulated per replica, gradients averaged
    over the replicas; ``losses``: replica 0's (what rank 0 reports)."""
    from torch.utils.data import DistributedSampler

    model = _model() if family == "llama" else _family_model(family)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = _data() if family == "llama" else _family_data(family)
    samplers = [DistributedSampler(data, num_replicas=replicas, rank=r, shuffle=True, seed=0) for r in range(replicas)]
    per_epoch = len(data) // replicas // 8
    losses = []
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        opt.zero_grad()
        for r, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            idx = torch.tensor(list(sampler))[i * 8 : (i + 1) * 8]
            x, y = data.tensors[0][idx], data.tensors[1][idx]
            total = 0.0
            for xc, yc in zip(x.chunk(microbatches), y.chunk(microbatches)):
                loss = _loss(model(xc), yc) / microbatches
                (loss / replicas).backward()
                total += loss.item()
            if r == 0:
                losses.append(total)
        opt.step()
    return {"losses": losses, "state": {f"model.{k}": v for k, v in model.state_dict().items()}}


def fit_hf_pp_zero3(steps: int) -> dict:
    """pp=2 x dp=2 on 4 ranks, ZeRO-3 (FSDP2) over each stage's replicas, the decoder adapter as
    each stage's forward (its FSDP root unit is the adapter the schedule calls)."""
    from lightning_scale.strategies import PipelineStrategy

    strategy = PipelineStrategy(stages=2, microbatches=4, split_points=["model.layers.2"], zero_stage=3,
                                stage_forward="lightning_scale.adapters.huggingface.decoder_stage_forward")
    task, losses = _fit(strategy, steps, devices=4)
    return {"losses": losses, "state": _full_state(task)}


def fit_hf_tp(steps: int) -> dict:
    """The documented Hugging Face TP plan, tp=2, plain Lightning training_step."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lightning_scale.strategies import TensorParallelStrategy

    plan = {
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
    }
    task, losses = _fit(TensorParallelStrategy(tensor_parallel_size=2, tp_plan=plan), steps)
    local_q = tuple(task.model.model.layers[0].self_attn.q_proj.weight.to_local().shape)
    return {"losses": losses, "state": _full_state(task), "local_q": local_q}


def fit_hf_tp_own_plan(steps: int) -> dict:
    """TensorParallelStrategy(tensor_parallel_size=2) with no tp_plan: the model's own Hugging Face
    plan (config.base_model_tp_plan) is read and translated."""
    from lightning_scale.strategies import TensorParallelStrategy

    task, losses = _fit(TensorParallelStrategy(tensor_parallel_size=2), steps)
    local_q = tuple(task.model.model.layers[0].self_attn.q_proj.weight.to_local().shape)
    local_down = tuple(task.model.model.layers[0].mlp.down_proj.weight.to_local().shape)
    return {"losses": losses, "state": _full_state(task), "local_q": local_q, "local_down": local_down}


def fit_family_tp(family: str, steps: int, sequence_parallel: bool = False, checkpoint_dir: str | None = None,
                  resume_from: str | None = None, activation_checkpointing: str | None = None) -> dict:
    """TensorParallelStrategy(tensor_parallel_size=2) with no plan: the model's built-in plan (GPT-2:
    Conv1D styles, c_attn split per q/k/v block)."""
    from torch.distributed.tensor import DTensor

    from lightning_scale.strategies import TensorParallelStrategy

    strategy = TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=sequence_parallel,
                                      activation_checkpointing=activation_checkpointing)
    task, losses = _fit(strategy, steps,
                        family=family, checkpoint_dir=checkpoint_dir, resume_from=resume_from)
    state = _full_state(task)
    if family != "gpt2":
        return {"losses": losses, "state": state,
                "local_shapes": {n: tuple(p.to_local().shape) for n, p in task.named_parameters()}}
    attn = task.model.transformer.h[0].attn
    weight = attn.c_attn.weight
    local_values = weight.to_local().detach().clone()
    # One more backward: every gradient has its parameter's layout, so a foreach optimizer step
    # (torch's default on CUDA) runs on local shards with no communication.
    from torch.distributed.tensor.debug import CommDebugMode

    x, y = _family_data(family).tensors
    task.zero_grad()
    _loss(task.model(x[:4]), y[:4]).backward()
    mismatched = [n for n, p in task.named_parameters() if tuple(p.grad.placements) != tuple(p.placements)]
    with CommDebugMode() as comm:
        torch.optim.AdamW(task.parameters(), lr=1e-3, foreach=True).step()
    return {"losses": losses, "state": state, "local_c_attn": tuple(weight.to_local().shape),
            "local_c_attn_values": local_values, "split_size": attn.split_size,
            "all_dtensors": all(isinstance(p, DTensor) for p in task.parameters()),
            "grad_layout_mismatches": mismatched, "foreach_step_collectives": comm.get_total_counts()}


def fit_family_3d(family: str, steps: int, zero_stage: int = 0, pipeline_parallel_size: int = 2,
                  sequence_parallel: bool = False, checkpoint_dir: str | None = None,
                  resume_from: str | None = None) -> dict:
    """Parallel3DStrategy(tensor_parallel_size=2) on 4 ranks with nothing model-specific given: the
    family's stage forward and built-in TP plan (pp=2 x tp=2, or pp=1 x dp=2 x tp=2 with ZeRO-3)."""
    from lightning_scale.strategies import Parallel3DStrategy

    strategy = Parallel3DStrategy(pipeline_parallel_size=pipeline_parallel_size, tensor_parallel_size=2, microbatches=4,
                                  zero_stage=zero_stage, sequence_parallel=sequence_parallel)
    task, losses = _fit(strategy, steps, devices=4, family=family, checkpoint_dir=checkpoint_dir,
                        resume_from=resume_from)
    return {"losses": losses, "state": _full_state(task)}


def load_family_weights(family: str, path: str, strategy_name: str) -> dict:
    """``weights_from=path`` (a Hugging Face save_pretrained directory) under ``strategy_name``,
    after setup (no step): this rank's tensors gathered, and the elements it read."""
    import lightning as L
    from torch.distributed.tensor import DTensor

    from lightning_scale.strategies import TensorParallelStrategy

    class HFTask(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _family_model(family)

        def training_step(self, batch, batch_idx):
            return _loss(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    strategy = {"tp": lambda: TensorParallelStrategy(tensor_parallel_size=2, weights_from=path)}[strategy_name]()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    task = HFTask()
    trainer.fit(task, DataLoader(_family_data(family), batch_size=8))
    c_attn = task.model.transformer.h[0].attn.c_attn.weight
    return {"state": _full_state(task), "local_c_attn": c_attn.to_local().detach().clone()}


def save_after_drift(steps: int, path: str) -> dict:
    """GPT-2 at TP = 2 for ``steps``, then rank 1's replicated parameters nudged (as rounding
    drift would, larger), then ``trainer.save_checkpoint(path)``: whether every replicated
    parameter is equal across the TP ranks after the save."""
    import torch.distributed as dist

    from lightning_scale.strategies import TensorParallelStrategy

    task, _ = _fit(TensorParallelStrategy(tensor_parallel_size=2), steps, family="gpt2", save_to=None)
    replicated = [(n, p) for n, p in task.named_parameters() if all(pl.is_replicate() for pl in p.placements)]
    if dist.get_rank() == 1:
        with torch.no_grad():
            for _, p in replicated:
                p.to_local().add_(1e-3)
    task.trainer.save_checkpoint(path)
    differ = []
    for name, p in replicated:
        both = [torch.empty_like(p.to_local()) for _ in range(2)]
        dist.all_gather(both, p.to_local().detach().contiguous())
        if not torch.equal(both[0], both[1]):
            differ.append(name)
    return {"differ_after_save": differ, "replicated": len(replicated)}
