"""LightningModule that trains :class:`~lightning_scale.models.GPT` on next-token prediction.

The contract the suite's strategies rely on (documented in docs/strategies/):

* the network is ``self.model`` (a plain ``nn.Module``: strategies split, shard or wrap it);
* the loss is the method ``loss_fn(output, target) -> scalar``, a mean over the (micro)batch;
* ``training_step`` and the eval steps compute ``self.loss_fn(self.model(x), y)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from lightning_scale.core.optim import OptimConfig, adamw_warmup_cosine
from lightning_scale.models.gpt import GPT, GPTConfig, sample_tokens
from lightning_scale.strategies.interface import data_parallel_group, outputs_here, share_from_output_ranks
from lightning_scale.tasks.metrics import compute_quietly


class LanguageModelingTask(LightningModule):
    """Next-token prediction with a GPT.

    Args:
        model: shape of the GPT (defaults to the ``nano`` preset).
        optim: AdamW and warm-up/cosine schedule settings.
        sample_prompt: text to continue at the end of ``fit`` (printed on rank 0) so a user sees
            what the model learned; empty string disables sampling.
        sample_tokens: number of tokens (bytes) to generate for the sample.
        seed: seed for the sample's random generator.
    """

    def __init__(
        self,
        model: GPTConfig | None = None,
        optim: OptimConfig | None = None,
        sample_prompt: str = "def ",
        sample_tokens: int = 200,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model_config = model or GPTConfig()
        self.optim_config = optim or OptimConfig()
        if sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0, got {sample_tokens}")
        self.sample_prompt = sample_prompt
        self.sample_tokens = sample_tokens
        self.seed = seed
        self.save_hyperparameters()
        self.model = GPT(self.model_config)
        # Token accuracy over every position of every sequence (micro average).
        self.val_acc = MulticlassAccuracy(num_classes=self.model_config.vocab_size, average="micro")
        # Perplexity = exp(total negative log-likelihood / tokens), summed over every token seen
        # (exact also when the last batch is smaller, unlike exp of the mean batch loss).
        self.val_ppl = Perplexity()
        self.last_sample: str | None = None

    # -- the strategy contract -------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over tokens. logits (B, T, V) float, targets (B, T) int64."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    # -- steps -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.val_acc.process_group = self.val_ppl.process_group = data_parallel_group(self.trainer)
        data_vocab = getattr(self.trainer.datamodule, "vocab_size", None) if self.trainer else None
        if data_vocab is not None and data_vocab > self.model_config.vocab_size:
            raise ValueError(
                f"the data has {data_vocab} token ids but model.vocab_size is "
                f"{self.model_config.vocab_size}; set model.vocab_size >= {data_vocab}"
            )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        loss = self.loss_fn(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> torch.Tensor:
        x, y = batch
        output = self.model(x)
        loss = self.loss_fn(output, y)
        logits = outputs_here(output)  # None on pipeline stages that do not hold the outputs
        if logits is not None:
            self.val_acc.update(logits.flatten(0, 1), y.flatten())
            self.val_ppl.update(logits.float(), y)  # (B, T, V) fp32, (B, T)
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def _log_epoch_metrics(self, prefix: str) -> None:
        # The metrics are synchronised over the data-parallel group of the ranks holding outputs
        # (the last pipeline stage), then shared with every rank so rank 0 logs the real values
        # under every strategy.
        for name, metric in (("token_acc", self.val_acc), ("perplexity", self.val_ppl)):
            value = share_from_output_ranks(self.trainer, compute_quietly(metric).to(self.device))
            metric.reset()
            self.log(f"{prefix}/{name}", value, sync_dist=True)  # identical on every rank: the mean is a no-op

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, batch_idx: int) -> torch.Tensor:
        prompt = batch[0] if isinstance(batch, (tuple, list)) else batch
        gen = torch.Generator(device=prompt.device).manual_seed(self.seed + batch_idx)
        # self.model (not self.model.generate) so a strategy may stand in for the network.
        return sample_tokens(self.model, prompt, self.sample_tokens, block_size=self.model_config.block_size, top_k=50, generator=gen)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1000
        return adamw_warmup_cosine(self.model, self.optim_config, total)

    # -- a sample at the end of fit -----------------------------------------------------------
    def on_fit_end(self) -> None:
        if self.sample_tokens == 0 or not self.sample_prompt:
            return
        # Every rank samples, with the same seed, so the same tokens: a tensor-parallel or ZeRO-3
        # forward is a collective of all ranks, and under pipeline parallelism each rank holds some
        # stages (with a V schedule rank 0 holds the first *and* the last), so there the ranks
        # sample together through the strategy (logits broadcast from the last stage).
        forward = getattr(self.trainer.strategy, "pipelined_forward", None) or self.model
        if not getattr(self.trainer.strategy, "supports_forward_only", True):
            rank_zero_info("No sample at the end of fit: this pipeline schedule has no forward-only mode.")
            return
        if getattr(self.trainer.strategy, "sequence_parallel", False):
            # Token-by-token sampling grows the sequence one position at a time; sequence
            # parallelism needs lengths divisible by the TP degree.
            rank_zero_info("No sample at the end of fit under sequence parallelism (sequence lengths must divide by tp).")
            return
        from lightning_scale.data.text import decode, encode

        was_training = self.model.training
        self.model.eval()
        prompt = encode(self.sample_prompt).unsqueeze(0).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        out = sample_tokens(forward, prompt, self.sample_tokens, block_size=self.model_config.block_size, top_k=50,
                            generator=gen)
        self.model.train(was_training)
        self.last_sample = decode(out[0])
        if self.trainer.global_rank == 0:
            rank_zero_info("\n--- sample from the trained model ---\n" + self.last_sample + "\n-------------------------------------")
