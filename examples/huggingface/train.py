"""Hugging Face ``transformers`` models under the suite's strategies: each family's LightningModule
is written the usual way (the model an attribute, the loss inline), and ``--strategy`` is the
only change. Nothing model-specific is given to any strategy: the stage forward, block container
and tensor-parallel plan come from the model.

    python examples/huggingface/train.py --family gpt2 --strategy tp_sp      # 2 ranks
    python examples/huggingface/train.py --family llama --strategy 3d        # 4 ranks: pp2 x tp2
    python examples/huggingface/train.py --family vit --strategy pipeline    # 2 ranks

Tiny configs and random data (nothing downloaded). For real weights build the model with
``from_pretrained(local_dir)``, or pass ``weights_from=local_dir`` to the strategy (each rank then
reads only its shards). Every family x strategy below is run as written by
``tests/test_examples.py``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
import transformers as tf
from torch.utils.data import DataLoader, TensorDataset

from lightning_scale.strategies import Parallel3DStrategy, PipelineStrategy, TensorParallelStrategy, ZeroStrategy

# strategy name -> (constructor, ranks it needs)
STRATEGIES = {
    "pipeline": (lambda: PipelineStrategy(stages=2, microbatches=4), 2),  # the family's stage forward, picked
    "tp": (lambda: TensorParallelStrategy(tensor_parallel_size=2), 2),  # the model's plan (GPT-2: Conv1D plan)
    "tp_sp": (lambda: TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True), 2),
    "zero3": (lambda: ZeroStrategy(stage=3), 2),
    "zero2_offload": (lambda: ZeroStrategy(stage=2, offload_optimizer=True), 2),
    "3d": (lambda: Parallel3DStrategy(pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=4), 4),
}


def gpt2() -> torch.nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0))


def llama() -> torch.nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                              max_position_embeddings=64))


def vit() -> torch.nn.Module:
    return tf.ViTForImageClassification(tf.ViTConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                                     num_attention_heads=4, image_size=16, patch_size=4,
                                                     num_labels=10, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0))


def bert() -> torch.nn.Module:
    return tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                                          num_attention_heads=4, vocab_size=128, num_labels=3,
                                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tokens_and_next() -> TensorDataset:  # (N, T) token ids and their next tokens, T = 16
    tokens = torch.randint(0, 128, (64, 17), generator=torch.Generator().manual_seed(0))
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def images_and_labels() -> TensorDataset:  # (N, 3, 16, 16) images, (N,) labels
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g))


def tokens_and_labels() -> TensorDataset:  # (N, T) token ids, (N,) labels
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 128, (64, 16), generator=g), torch.randint(0, 3, (64,), generator=g))


# family -> (model, data, strategies it runs here)
FAMILIES = {
    "gpt2": (gpt2, tokens_and_next, ["pipeline", "tp", "tp_sp", "zero3", "3d"]),
    "llama": (llama, tokens_and_next, ["pipeline", "tp", "zero3", "3d"]),
    "vit": (vit, images_and_labels, ["pipeline", "zero3", "zero2_offload"]),
    "bert": (bert, tokens_and_labels, ["pipeline", "zero3"]),
}


class Task(L.LightningModule):
    def __init__(self, family: str) -> None:
        super().__init__()
        self.model = FAMILIES[family][0]()

    def loss_fn(self, output, target):  # the pipeline runs it on the last stage, per microbatch
        logits = output.logits if hasattr(output, "logits") else output
        if logits.dim() == 3:  # a language model: (B, T, V) against (B, T)
            return F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return F.cross_entropy(logits, target)  # a classifier: (B, classes) against (B,)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        loss = self.loss_fn(self.model(inputs), target)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="gpt2")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="tp")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    if args.strategy not in FAMILIES[args.family][2]:
        parser.error(f"--family {args.family} runs here with --strategy in {FAMILIES[args.family][2]}")
    make_strategy, ranks = STRATEGIES[args.strategy]
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="auto", devices=ranks, strategy=make_strategy(), max_steps=args.steps,
                        callbacks=[Record()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Task(args.family), DataLoader(FAMILIES[args.family][1](), batch_size=8))
    if trainer.is_global_zero:
        print(f"example {args.family} {args.strategy}: {type(trainer.strategy).__name__} on {trainer.world_size} "
              f"ranks, losses {' '.join(f'{x:.4f}' for x in losses)}")


if __name__ == "__main__":
    main()
