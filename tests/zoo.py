"""LightningModules written the way users write them (not the suite's tasks): the zoo that every
strategy is tried on (tests/test_zoo.py).

Each is an ordinary Lightning module: layers as attributes (on the module itself or on a
submodule), the loss computed inline in ``training_step``, ``configure_optimizers`` returning a
torch optimizer, no suite-specific methods. Data is synthetic and deterministic (``batches``);
every model is built under a fixed seed, so each rank and the single-process reference start
from the same weights. Dropout is 0: parity is exact in fp32.

Shapes (``SHAPES``):

===================  ======================================================================
name                 what it exercises
===================  ======================================================================
layers_on_module     layers directly on the LightningModule, ``example_input_array`` set
sequential           ``self.net = nn.Sequential(...)`` (the commonest small-model shape)
custom_model_loop    ``self.model`` a custom ``nn.Module`` looping over a ``ModuleList``
metrics_in_val       torchmetrics ``Accuracy`` in ``validation_step``
mha_transformer      a char-level LM on ``nn.MultiheadAttention`` blocks
cnn                  a small CNN classifier (``Conv2d``, ``BatchNorm2d`` is left out: its
                     running statistics are per rank)
configure_model      layers built in ``configure_model`` (Lightning's hook for large models)
blocks_in_dict       blocks in an ``nn.ModuleDict`` keyed by name
===================  ======================================================================
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, HIDDEN, CLASSES = 32, 8, 32, 4
LR = 1e-2


def _adamw(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=0.01)


# -- 1. layers on the LightningModule itself ------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class LayersOnModule(L.LightningModule):
    """Token classifier: embedding, 4 residual MLP blocks, head, all attributes of the module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block(HIDDEN) for _ in range(4))
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.example_input_array = torch.zeros(2, SEQ, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return _adamw(self)


# -- 2. self.net = nn.Sequential --------------------------------------------------------------------
class SequentialNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(HIDDEN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, CLASSES),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


# -- 3. a custom self.model looping over a ModuleList ---------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.layers = nn.ModuleList(Block(HIDDEN) for _ in range(4))
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class CustomModelLoop(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return _adamw(self)


# -- 4. torchmetrics in validation_step --------------------------------------------------------------
class MetricsInVal(CustomModelLoop):
    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.val_acc = MulticlassAccuracy(num_classes=CLASSES)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)


# -- 5. a char-level LM on nn.MultiheadAttention ----------------------------------------------------
class AttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        t = x.size(1)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MHATransformer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Parameter(torch.zeros(1, SEQ, HIDDEN))
        self.layers = nn.ModuleList(AttentionBlock(HIDDEN, 2) for _ in range(2))
        self.ln_f = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.example_input_array = torch.zeros(2, SEQ, dtype=torch.long)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.size(1)]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # SGD, not AdamW: nn.MultiheadAttention's key bias gets a mathematically zero gradient
        # (softmax ignores a constant added to every score of a row), so its ~1e-10 float noise
        # differs between any two reduction orders, and AdamW's normalisation would turn that noise
        # into updates of ~lr per step: a difference between runs, not a bug of either.
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


# -- 6. a CNN -----------------------------------------------------------------------------------------
class CNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(8 * 4, CLASSES)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return _adamw(self)


# -- 7. layers built in configure_model --------------------------------------------------------------
class ConfigureModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None

    def configure_model(self):
        if self.model is not None:
            return
        torch.manual_seed(0)
        self.model = TinyNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return _adamw(self)


# -- 8. blocks in a ModuleDict ------------------------------------------------------------------------
class BlocksInDict(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(HIDDEN, HIDDEN)
        self.stages = nn.ModuleDict({f"stage{i}": Block(HIDDEN) for i in range(4)})
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return _adamw(self)


SHAPES: dict[str, type[L.LightningModule]] = {
    "layers_on_module": LayersOnModule,
    "sequential": SequentialNet,
    "custom_model_loop": CustomModelLoop,
    "metrics_in_val": MetricsInVal,
    "mha_transformer": MHATransformer,
    "cnn": CNN,
    "configure_model": ConfigureModel,
    "blocks_in_dict": BlocksInDict,
}


# -- shapes that probe the pipeline's traced frontend (not counted among the 8) -------------------------
class FunctionalTie(LayersOnModule):
    """The head reuses the embedding's weight in a functional call, and a scale parameter held by
    the module itself is used before and after the blocks: torch's tracer puts both on two stages.
    The inherited ``head`` is left unused (a parameter without gradients, which must stay as is)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x):
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = block(h)
        return F.linear(h * self.scale, self.embed.weight)

    def configure_optimizers(self):
        # SGD: the two stages' gradients of the shared weight are summed in another order than
        # one process's autograd sums them (float rounding, ~1e-7); AdamW's normalisation turns
        # such noise on near-zero gradients into lr-sized steps.
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


class LossOutsideForward(L.LightningModule):
    """Tensors the forward never touches: a class-prior buffer and a temperature parameter used
    in training_step (the loss stays a per-sample mean; class *weights* in CrossEntropyLoss would
    make each microbatch's mean a different weighted mean than the batch's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyNet()
        self.register_buffer("class_prior", torch.linspace(-0.5, 0.5, CLASSES))
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x) / self.temperature + self.class_prior, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return _adamw(self)


class NoisyInputs(CustomModelLoop):
    """Draws noise before the network call: its replay per microbatch would see other inputs."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x + 0.1 * torch.randn_like(x)), y)


MORE: dict[str, type[L.LightningModule]] = {
    "functional_tie": FunctionalTie,
    "loss_outside_forward": LossOutsideForward,
    "noisy_inputs": NoisyInputs,
}
ALL = {**SHAPES, **MORE}


def batches(shape: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` deterministic samples (inputs, targets) for ``shape``."""
    g = torch.Generator().manual_seed(seed)
    if shape in ("layers_on_module", "mha_transformer", "functional_tie"):
        x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        return x, torch.roll(x, -1, dims=1)
    if shape == "cnn":
        return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return torch.randn(n, HIDDEN, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


class ZooData(L.LightningDataModule):
    """The samples of ``batches(shape, samples)`` as a datamodule (what a LightningCLI recipe names)."""

    def __init__(self, shape: str = "layers_on_module", batch_size: int = 8, samples: int = 64) -> None:
        super().__init__()
        self.shape, self.batch_size, self.samples = shape, batch_size, samples

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(*batches(self.shape, self.samples)), batch_size=self.batch_size)


# -- the change PipelineStrategy asks of a module ---------------------------------------------------
class LossMethod:
    """Mixin: the loss as a method, ``loss = self.loss_fn(network(x), y)``, and example inputs.

    PipelineStrategy runs the loss on the last stage, where the outputs are, so it needs the loss
    as a method of (output, target) (its setup error names exactly this), and it traces the
    forward with ``example_input_array``. Same loss as the shapes' inline ones."""

    def loss_fn(self, output, target):
        return F.cross_entropy(output.reshape(-1, output.size(-1)), target.reshape(-1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        network = self.model if "model" in self._modules or "model" in self.__dict__ else self
        loss = self.loss_fn(network(x), y)
        self.log("train_loss", loss)
        return loss


def with_loss_method(shape: str) -> type[L.LightningModule]:
    base = ALL[shape]

    class Changed(LossMethod, base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = batches(shape, 2)[0]

    Changed.__name__ = Changed.__qualname__ = f"{base.__name__}WithLossMethod"
    return Changed
