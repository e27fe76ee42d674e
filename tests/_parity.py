"""The parity assertion every Lightning-level parallel test uses (one definition, one tolerance).

Tolerances (the project standard for fp32 parity): relative per-step loss difference <= 1e-5,
max abs weight difference <= 1e-5, over >= 20 optimizer steps.
"""

from __future__ import annotations

STEPS = 20
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def assert_parity(results: list[dict], ref: dict, *, every_rank_holds_all: bool = False) -> None:
    """``results``: per-rank ``{"losses", "state"}``; ``ref``: the single-process ``{"losses", "state"}``.

    Each rank logs its replica's loss (identical on the model-parallel ranks of a replica); the
    reference loss is the mean over replicas, i.e. the mean over all ranks. Each rank's tensors
    must match the reference, together the ranks must hold every tensor, and with
    ``every_rank_holds_all`` (tensor parallel, gathered to full tensors) each rank all of them.
    """
    for res in results:
        assert len(res["losses"]) == len(ref["losses"]) >= STEPS
    mean = [sum(vals) / len(vals) for vals in zip(*(r["losses"] for r in results))]
    for step, (a, b) in enumerate(zip(mean, ref["losses"])):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: loss {a} vs reference {b}"
    for rank, res in enumerate(results):
        assert res["state"], f"rank {rank} holds no parameters"
        if every_rank_holds_all:
            assert set(res["state"]) == set(ref["state"]), f"rank {rank}"
        for name, value in res["state"].items():
            diff = (value - ref["state"][name]).abs().max().item()
            assert diff <= WEIGHT_ATOL, f"rank {rank} {name}: max abs diff {diff}"
    held = set().union(*(r["state"] for r in results))
    assert held == set(ref["state"])


def assert_planner_states(results: list[dict]) -> None:
    """The memory planner's model-state prediction for each rank equals the bytes of the tensors
    the rank held after its last step (parameters, gradients, optimizer state), to the byte."""
    for rank, r in enumerate(results):
        assert r["predicted"] is not None, f"rank {rank}: the planner does not model this run"
        predicted = {c: r["predicted"][c] for c in ("params", "grads", "optimizer")}
        assert r["state_bytes"] == predicted, f"rank {rank}: tensors {r['state_bytes']} vs planner {predicted}"


def assert_sample_matches_full_model(results: list[dict], cfg, prompt: str = "12", tokens: int = 12) -> None:
    """Every rank sampled the same text at the end of fit (``LanguageModelingTask.on_fit_end``), and it
    is the text the full model with the trained weights gives (same seed, same prompt)."""
    import torch

    from lightning_scale.data.text import decode, encode
    from lightning_scale.models import GPT
    from lightning_scale.models.gpt import sample_tokens

    samples = {r["sample"] for r in results}
    assert len(samples) == 1 and None not in samples, samples
    state: dict = {}
    for r in results:
        state.update(r["state"])
    model = GPT(cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.eval()
    ref = sample_tokens(model, encode(prompt).unsqueeze(0), tokens, block_size=cfg.block_size, top_k=50,
                        generator=torch.Generator().manual_seed(0))
    assert samples.pop() == decode(ref[0])


def assert_val_metrics(results: list[dict], ref_state: dict) -> None:
    """``trainer.validate`` after fit (``fit(..., validate=True)``) logged, on every rank, the loss,
    token accuracy and perplexity one process computes with torchmetrics from the reference's
    trained weights. Each data-parallel rank sees part of the data, so a metric not synchronised
    over dp fails this; the ranks without outputs (early pipeline stages) must log the last
    stage's value. (A sync over the model-parallel ranks too would count duplicates of both
    numerator and denominator, which these ratio metrics cannot detect.)"""
    from _pipeline_targets import reference_val_metrics

    ref = reference_val_metrics(ref_state)
    for rank, r in enumerate(results):
        assert r["val"] is not None, f"rank {rank}: no validation ran"
        for name, value in ref.items():
            got = r["val"][name]
            assert abs(got - value) <= LOSS_RTOL * abs(value), f"rank {rank} {name}: {got} vs single process {value}"
