"""Predicted activation memory of a decoder transformer: the bytes a forward leaves for the backward.

Torch-free. Shapes: b = microbatch size, s = sequence length, h = hidden size, a = heads,
f = MLP hidden size, V = vocabulary, L = layers, t = tensor-parallel degree, N = s b h.

**The inventory.** Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, section 4.1) count what each op of a layer saves. This module keeps
that count as a list of named items (:func:`layer_items`), so the same enumeration gives

* the paper's formula, with :meth:`ActivationModel.paper` (16-bit, dropout, unfused attention,
  Megatron sequence parallelism): ``s b h (34 + 5 a s / h)`` per layer, ``sbh (10 + 24/t +
  5as/(ht))`` with TP and ``sbh (34 + 5as/h) / t`` with TP + SP; and
* what this suite's GPT (:mod:`lightning_scale.models.transformer`) really saves, with
  :meth:`ActivationModel.for_precision`: a fused attention kernel (``scaled_dot_product_attention``
  saves q, k, v, its output and a per-row log-sum-exp instead of the s x s matrices), dropout
  off by default, LayerNorm statistics, and DTensor sequence parallelism, where the linear after
  a LayerNorm keeps the *gathered* (B, T, D) input (Megatron keeps the shard and re-gathers it
  in the backward). In fp32 this matches the saved-tensor measurement byte for byte (tests).

**The ViT** (:mod:`lightning_scale.models.vit`) uses the same block, so :func:`layer_items`
applies with s = patches + 1 tokens; what it keeps outside the blocks (patch convolution,
``ln_f``, a head on the [CLS] row, a (b, classes) loss) is :func:`vit_outer_items`, passed to
:func:`model_activation_bytes` as ``outer``. Models without such an inventory (the ResNet) are
measured by a forward on the ``meta`` device instead (:mod:`lightning_scale.core.meta_activations`).

**Recomputation** (:mod:`lightning_scale.core.activation_checkpointing` policies): ``full`` keeps
each block's input (``2sbh`` in 16-bit, the paper's figure); ``selective`` keeps the block
input, q, k, v, the attention output and the non-widening matmul outputs; ``every_k`` mixes the
two; ``offload`` moves the saved tensors to host memory.

**Pipelines** hold several microbatches at once (:func:`in_flight_microbatches`): GPipe all
``m``; 1F1B ``p - r`` on pipeline rank r (so rank 0 holds L/p layers x p microbatches = one
full model's worth, the paper's observation); interleaved 1F1B with v chunks per rank
``2 (p - r - 1) + (v - 1) p + 1`` chunk-microbatches, which on rank 0 is the paper's
``L (1 + (p - 1) / (p v))`` layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION = ("fused", "math")
AC_POLICIES = ("none", "full", "selective", "every_k", "offload")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


@dataclass(frozen=True)
class ActivationModel:
    """How a layer's saved tensors are stored.

    Args:
        act_bytes: bytes per element of the tensors matmuls and attention save (2 in 16-bit).
        residual_bytes: bytes per element of the residual stream (the LayerNorm inputs; fp32
            under ``bf16-mixed`` autocast, which keeps the residual adds in fp32).
        dropout: dropout is active (p > 0): 1-byte masks (and, with ``attention="math"``, the
            dropped-out attention probabilities).
        attention: ``"fused"`` (flash / SDPA kernels) or ``"math"`` (softmax(QK^T) materialised).
        sp_saves_gathered: with sequence parallelism, the linear after a LayerNorm keeps the
            all-gathered (b, s, h) input (DTensor's ``SequenceParallel`` + ``ColwiseParallel``);
            False: it keeps the (b, s/t, h) shard and re-gathers in the backward (Megatron).
        weight_copy_bytes: autocast keeps a low-precision copy of every matmul weight for the
            backward (``bf16-mixed``: 2); 0 when parameters are already in the compute dtype.
        small_terms: count LayerNorm mean/rstd, the attention log-sum-exp, position indices and
            loss scalars (fp32, O(s b) each); the paper leaves them out.
        qkv_input_copies: copies of the attention input (ln_1 output) that q, k and v keep. 1 when
            the three projections share one tensor; 3 under autocast with an fp32 residual stream:
            autocast casts the fp32 ln_1 output to 16-bit once per projection (its cast cache holds
            parameters only), and each projection keeps its own copy (measured on CPU autocast, the
            same rule as CUDA's). :meth:`for_precision` sets 3 under ``*-mixed``.
    """

    act_bytes: int = 4
    residual_bytes: int = 4
    dropout: bool = False
    attention: str = "fused"
    sp_saves_gathered: bool = True
    weight_copy_bytes: int = 0
    small_terms: bool = True
    qkv_input_copies: int = 1

    def __post_init__(self) -> None:
        if self.qkv_input_copies not in (1, 3):
            raise ValueError(f"qkv_input_copies must be 1 (shared) or 3 (one per projection); "
                             f"got {self.qkv_input_copies!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}; got {self.attention!r}")
        for name in ("act_bytes", "residual_bytes"):
            if getattr(self, name) not in (1, 2, 4, 8):
                raise ValueError(f"{name} must be 1, 2, 4 or 8 bytes; got {getattr(self, name)!r}")

    @classmethod
    def paper(cls) -> ActivationModel:
        """Korthikanti et al.'s setting: 16-bit, dropout on, unfused attention, Megatron SP."""
        return cls(act_bytes=2, residual_bytes=2, dropout=True, attention="math", sp_saves_gathered=False,
                   small_terms=False)

    @classmethod
    def for_precision(cls, precision: str, *, dropout: bool = False, attention: str = "fused") -> ActivationModel:
        """This suite's models under a Lightning ``precision`` string."""
        p = str(precision)
        if p in ("32-true", "32", "64-true"):
            return cls(act_bytes=4, residual_bytes=4, dropout=dropout, attention=attention)
        if p in ("bf16-mixed", "16-mixed"):
            return cls(act_bytes=2, residual_bytes=4, dropout=dropout, attention=attention, weight_copy_bytes=2,
                       qkv_input_copies=3)
        if p in ("bf16-true", "16-true", "mixed"):
            return cls(act_bytes=2, residual_bytes=2, dropout=dropout, attention=attention)
        raise ValueError(f"unknown precision {precision!r}; use 32-true, bf16-mixed, 16-mixed, bf16-true or 16-true")


@dataclass(frozen=True)
class LayerShape:
    """What a layer's activations depend on."""

    b: int  # microbatch size (sequences)
    s: int  # sequence length (tokens)
    h: int  # hidden size
    a: int  # attention heads
    f: int  # MLP hidden size
    t: int = 1  # tensor-parallel degree
    sp: bool = False  # sequence parallel (LayerNorm regions sharded on s)

    def __post_init__(self) -> None:
        for name in ("b", "s", "h", "a", "f", "t"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("h", "a", "f"):
            if getattr(self, name) % self.t:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by the tensor-parallel degree {self.t}")
        if self.sp and self.s % self.t:
            raise ValueError(f"sequence parallel needs the sequence length ({self.s}) divisible by tp={self.t}")


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float


def layer_items(shape: LayerShape, model: ActivationModel, policy: str = "none") -> list[Item]:
    """What one transformer layer keeps for the backward, per microbatch, on one TP rank.

    ``policy`` is the layer's recomputation: ``none``, ``full`` (block input only) or
    ``selective`` (see the module docstring); ``offload`` and ``every_k`` are whole-model
    choices (see :func:`model_activation_bytes`).
    """
    b, s, h, a, f, t = shape.b, shape.s, shape.h, shape.a, shape.f, shape.t
    n = s * b * h  # elements of one (b, s, h) tensor
    ab, rb = model.act_bytes, model.residual_bytes
    sp_div = t if shape.sp else 1  # LayerNorm regions are sharded only with sequence parallelism
    gathered_div = 1 if (not shape.sp or model.sp_saves_gathered) else t
    tok = s * b  # tokens
    items: list[Item] = []

    def add(name: str, value: float) -> None:
        items.append(Item(name, value))

    if policy == "full":
        add("block input (recomputed from here)", n * rb / sp_div)
        return items
    if policy == "selective":
        add("block input", n * rb / sp_div)
        add("q, k, v", 3 * n * ab / t)
        add("attention output", n * ab / t)
        if model.small_terms:
            add("attention log-sum-exp (fp32)", tok * a * 4 / t)
        # Non-widening matmul outputs: the two row-parallel projections ((b, s, h) partial sums
        # on each TP rank) and, when f/t <= h on a TP rank, the MLP up projection too.
        add("attention out_proj output", n * ab)
        add("MLP down_proj output", n * ab)
        if f // t <= h:
            add("MLP up_proj output (not widening on this rank)", tok * f * ab / t)
        if t > 1:
            add("all-reduce outputs (kept by the policy)", 2 * n * ab)
        return items
    if policy != "none":
        raise ValueError(f"per-layer policy must be none, full or selective; got {policy!r}")

    add("ln_1 input", n * rb / sp_div)
    if model.qkv_input_copies == 1:
        add("attention input (ln_1 output)", n * ab / gathered_div)
    else:  # autocast: one 16-bit copy of the fp32 ln_1 output per q/k/v projection
        add("attention input (ln_1 output), one autocast copy per q, k, v",
            model.qkv_input_copies * n * ab / gathered_div)
    add("q, k", 2 * n * ab / t)
    if model.attention == "math":
        add("softmax(QK^T)", b * a * s * s * ab / t)
        if model.dropout:
            add("attention dropout mask", b * a * s * s * 1 / t)
            add("attention dropout output", b * a * s * s * ab / t)
    add("v", n * ab / t)
    if model.attention == "math":
        add("out_proj input (attention context)", n * ab / t)
    else:
        # The fused kernel's output is saved by the kernel and is the out_proj input (one storage).
        add("attention output = out_proj input", n * ab / t)
        if model.small_terms:
            add("attention log-sum-exp (fp32)", tok * a * 4 / t)
    if model.dropout:
        add("residual dropout mask (attention)", n * 1 / sp_div)
    add("ln_2 input", n * rb / sp_div)
    add("MLP input (ln_2 output)", n * ab / gathered_div)
    add("GELU input (up_proj output)", tok * f * ab / t)
    add("down_proj input (GELU output)", tok * f * ab / t)
    if model.dropout:
        add("residual dropout mask (MLP)", n * 1 / sp_div)
    if model.small_terms:
        add("LayerNorm mean/rstd (fp32)", 2 * 2 * tok * 4 / sp_div)
    if model.weight_copy_bytes:
        add("autocast weight copies", (4 * h * h + 2 * h * f) / t * model.weight_copy_bytes)
    return items


def layer_bytes(shape: LayerShape, model: ActivationModel, policy: str = "none") -> float:
    return sum(i.bytes for i in layer_items(shape, model, policy))


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, *, sp: bool = False,
                            recompute: str = "none") -> float:
    """The paper's closed forms (16-bit), per layer: the reference :func:`layer_items` must reproduce.

    ``recompute``: ``none``; ``selective`` (attention core recomputed: ``34 sbh / t``, with SP);
    ``full`` (``2 sbh``).
    """
    if recompute == "full":
        return 2 * s * b * h
    if recompute == "selective":
        return s * b * h * 34 / t
    if sp:
        return s * b * h * (34 + 5 * a * s / h) / t
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def outer_items(*, b: int, s: int, h: int, vocab: int, t: int = 1, sp: bool = False, first: bool = True,
                last: bool = True, model: ActivationModel) -> list[Item]:
    """What the embeddings (first pipeline stage) and the final norm, head and loss (last stage) keep.

    The loss is cross-entropy on fp32 logits: ``log_softmax`` keeps its (b s, V) fp32 output.
    The token ids are the batch and are not counted.
    """
    n, tok = s * b * h, s * b
    sp_div = t if sp else 1
    gathered_div = 1 if (not sp or model.sp_saves_gathered) else t
    items: list[Item] = []
    if first:
        if model.small_terms:
            items.append(Item("position ids (int64)", s * 8))
        if model.dropout:
            items.append(Item("embedding dropout mask", n * 1 / sp_div))
    if last:
        items.append(Item("ln_f input", n * model.residual_bytes / sp_div))
        items.append(Item("head input (ln_f output)", n * model.act_bytes / gathered_div))
        items.append(Item("log-softmax of the logits (fp32)", tok * vocab * 4))
        if model.weight_copy_bytes:
            items.append(Item("autocast copy of the head weight", vocab * h * model.weight_copy_bytes))
        if model.small_terms:
            items.append(Item("ln_f mean/rstd (fp32)", 2 * tok * 4 / sp_div))
            items.append(Item("loss weight (fp32 scalar)", 4))
    return items


def vit_outer_items(*, b: int, s: int, h: int, num_classes: int, image_shape: tuple[int, int, int],
                    patch_weight: int, t: int = 1, sp: bool = False, first: bool = True, last: bool = True,
                    model: ActivationModel) -> list[Item]:
    """What a ViT (:class:`lightning_scale.models.ViT`) keeps outside its blocks, per microbatch.

    ``image_shape`` is (C, H, W) of one image; ``patch_weight`` the elements of the patch
    convolution's weight (D C P P); ``s`` = patches + 1 tokens. First stage: the convolution saves
    the images (the batch: not counted) and its weight, the [CLS] concatenation and the position
    add save nothing; under autocast the convolution keeps low-precision copies of both. Last
    stage: ``ln_f`` keeps its input (the full sequence: with sequence parallelism the ViT plan
    gathers it before ``ln_f``) and the head reads the [CLS] row of its output; the head's
    ``addmm`` keeps that (b, h) row as a view of the whole (b, s, h) ``ln_f`` output, unless
    autocast casts it (a (b, h) copy). The loss keeps the fp32 log-softmax of the (b, classes)
    logits. The (b, classes) logits themselves are the caller's (a transient, not counted here).
    """
    n, tok = s * b * h, s * b
    sp_div = t if sp else 1
    items: list[Item] = []
    if first:
        if model.dropout:
            items.append(Item("embedding dropout mask", n * 1 / sp_div))
        if model.weight_copy_bytes:
            c, hh, ww = image_shape
            items.append(Item("autocast copy of the images (patch convolution input)",
                              b * c * hh * ww * model.act_bytes))
            items.append(Item("autocast copy of the patch-embedding weight", patch_weight * model.weight_copy_bytes))
    if last:
        items.append(Item("ln_f input (full sequence)", n * model.residual_bytes))
        if model.weight_copy_bytes:
            items.append(Item("head input ([CLS] row, autocast copy)", b * h * model.act_bytes))
            items.append(Item("autocast copy of the head weight", num_classes * h * model.weight_copy_bytes))
        else:
            items.append(Item("head input (a view of the whole ln_f output)", n * model.act_bytes))
        items.append(Item("log-softmax of the logits (fp32)", b * num_classes * 4))
        if model.small_terms:
            items.append(Item("ln_f mean/rstd (fp32)", 2 * tok * 4))
            items.append(Item("loss weight (fp32 scalar)", 4))
    return items


def in_flight_microbatches(schedule: str, p: int, m: int, rank: int, v: int = 1) -> int:
    """Microbatches (chunk-microbatches for interleaved) whose activations rank ``rank`` holds at its peak."""
    if schedule not in SCHEDULES:
        raise ValueError(
            f"activation memory is modelled for the schedules {SCHEDULES}; got {schedule!r} "
            f"(plan with '1f1b' for a zero-bubble variant: it holds at least as much)"
        )
    if not 0 <= rank < p:
        raise ValueError(f"pipeline rank {rank} outside 0..{p - 1}")
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(p - rank, m)
    return min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v)


def layer_policies(n_layer: int, policy: str, every: int = 2) -> list[str]:
    """Per-layer policy of a whole-model AC policy (``every_k``: layers i % every == 0 are full)."""
    if policy not in AC_POLICIES:
        raise ValueError(f"activation checkpointing policy must be one of {AC_POLICIES}; got {policy!r}")
    if policy == "every_k":
        if every < 1:
            raise ValueError(f"every must be >= 1; got {every}")
        return ["full" if i % every == 0 else "none" for i in range(n_layer)]
    if policy == "offload":
        return ["none"] * n_layer
    return [policy] * n_layer


@dataclass
class ActivationEstimate:
    """Per rank: bytes kept on the device and on the host at the activation peak."""

    device: float
    host: float = 0.0
    recompute_peak: float = 0.0  # transient: one recomputed layer during the backward (full / every_k)
    items: list[Item] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.device + self.host


def model_activation_bytes(
    *,
    b: int,
    s: int,
    h: int,
    a: int,
    f: int,
    vocab: int,
    layers: list[int] | int,
    n_layer: int | None = None,
    t: int = 1,
    sp: bool = False,
    policy: str = "none",
    every: int = 2,
    model: ActivationModel | None = None,
    first: bool = True,
    last: bool = True,
    in_flight: int = 1,
    outer: list[Item] | None = None,
) -> ActivationEstimate:
    """Activation bytes of one rank holding ``layers`` (indices, or a count from 0) for ``in_flight``
    microbatches of ``b`` sequences. ``n_layer`` is the whole model's depth (for ``every_k``).

    The last stage's head and loss are held for one microbatch under 1F1B (its backward follows
    at once) but for all of them under GPipe: pass ``in_flight`` accordingly; here the outer
    items are multiplied by ``in_flight`` like the layers.
    """
    model = model or ActivationModel()
    idx = list(range(layers)) if isinstance(layers, int) else list(layers)
    total_layers = n_layer if n_layer is not None else (max(idx) + 1 if idx else 0)
    per_layer = layer_policies(total_layers, policy, every)
    shape = LayerShape(b=b, s=s, h=h, a=a, f=f, t=t, sp=sp)
    items: list[Item] = []
    full_layer = layer_bytes(shape, model, "none")
    recompute_peak = 0.0
    for i in idx:
        p = per_layer[i]
        items.extend(Item(f"layer {i}: {it.name}", it.bytes) for it in layer_items(shape, model, p))
        if p in ("full", "selective"):
            recompute_peak = max(recompute_peak, full_layer - layer_bytes(shape, model, p))
    if outer is None:
        outer = outer_items(b=b, s=s, h=h, vocab=vocab, t=t, sp=sp, first=first, last=last, model=model)
    items.extend(outer)
    per_microbatch = sum(i.bytes for i in items)
    held = per_microbatch * in_flight
    if policy == "offload":
        # save_on_cpu: the saved tensors live in host memory until the backward fetches them.
        return ActivationEstimate(device=0.0, host=held, recompute_peak=0.0, items=items)
    return ActivationEstimate(device=held, recompute_peak=recompute_peak, items=items)


__all__ = [
    "ActivationEstimate",
    "ActivationModel",
    "Item",
    "LayerShape",
    "in_flight_microbatches",
    "korthikanti_layer_bytes",
    "layer_bytes",
    "layer_items",
    "layer_policies",
    "model_activation_bytes",
    "outer_items",
    "vit_outer_items",
]
