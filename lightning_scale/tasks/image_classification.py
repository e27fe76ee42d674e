"""LightningModule for image classification with the suite's ViT or ResNet.

Same strategy contract as :mod:`lightning_scale.tasks.language_modeling`: the network is
``self.model`` and the loss is ``loss_fn(output, target)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics.classification import MulticlassAccuracy

from lightning_scale.core.optim import OptimConfig, adamw_warmup_cosine
from lightning_scale.models.resnet import ResNet, ResNetConfig
from lightning_scale.models.vit import ViT, ViTConfig
from lightning_scale.strategies.interface import data_parallel_group, outputs_here, share_from_output_ranks
from lightning_scale.tasks.metrics import compute_quietly


class ImageClassificationTask(LightningModule):
    """Cross-entropy classification.

    Args:
        model: a :class:`ViTConfig` (default, sized for 8x8 digits) or a :class:`ResNetConfig`.
        optim: AdamW and warm-up/cosine schedule settings.
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    def __init__(
        self,
        model: ViTConfig | ResNetConfig | None = None,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model_config = model or ViTConfig()
        self.optim_config = optim or OptimConfig(lr=3e-3, weight_decay=0.05, beta2=0.999)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.save_hyperparameters()
        if isinstance(self.model_config, ViTConfig):
            self.model: torch.nn.Module = ViT(self.model_config)
        else:
            self.model = ResNet(self.model_config)
        num_classes = self.model_config.num_classes
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy. logits (B, num_classes) float, labels (B,) int64."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def setup(self, stage: str) -> None:
        self.val_acc.process_group = self.test_acc.process_group = data_parallel_group(self.trainer)
        dm = self.trainer.datamodule if self.trainer else None
        cfg = self.model_config
        checks = {
            "num_classes": (getattr(dm, "num_classes", None), cfg.num_classes),
            "in_channels": (getattr(dm, "in_channels", None), cfg.in_channels),
        }
        if isinstance(cfg, ViTConfig):
            checks["image_size"] = (getattr(dm, "image_size", None), cfg.image_size)
        for name, (data_value, model_value) in checks.items():
            if data_value is not None and data_value != model_value:
                raise ValueError(
                    f"the data has {name}={data_value} but the model config has {name}={model_value}; "
                    f"set model.{name}: {data_value}"
                )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, C, H, W), (B,)
        loss = self.loss_fn(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, metric) -> torch.Tensor:
        x, y = batch
        output = self.model(x)
        loss = self.loss_fn(output, y)
        logits = outputs_here(output)  # None on pipeline stages that do not hold the outputs
        if logits is not None:
            metric.update(logits, y)
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def _log_accuracy(self, prefix: str, metric) -> None:
        acc = share_from_output_ranks(self.trainer, compute_quietly(metric).to(self.device))
        metric.reset()
        self.log(f"{prefix}/acc", acc, prog_bar=True, sync_dist=True)  # identical on every rank

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val", self.val_acc)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x).argmax(dim=-1)

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1000
        return adamw_warmup_cosine(self.model, self.optim_config, total)
