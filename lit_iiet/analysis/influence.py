"""Iteration influence: how much each layer's extra fixed-point iterations change the model, and what to prune.

Shared by the influence-logging and IIAD callbacks and by notebooks/iteration_influence.ipynb. The IIET paper's
exact influence metric was not recoverable, so all of these are measured and the threshold rule
works on any of them; `relative refinement` is the default.

For a layer with input y and iterates z_1..z_r (z_1 is the vanilla layer's output), per token:
  increment k        ||z_k - z_{k-1}|| / ||z_{k-1}||   (z_0 = y; k = 1 is the vanilla update's size)
  refinement         ||z_r - z_1|| / ||z_1||           how far the implicit iterations move the explicit step
  cosine drift       1 - cos(z_r, z_1)
  ablation influence the rise of the loss when this layer alone drops to one iteration
Each is averaged over the calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_iiet.analysis.convergence import ConvergenceMeter
from lit_iiet.errors import UserInputError
from lit_iiet.nn.decoder import next_token_loss


@dataclass
class IterationStats:
    """Per-layer measurements of an IIET stack on some calibration batches."""

    schedule: list[int]
    increments: list[list[float]] = field(default_factory=list)
    """increments[l][k-1]: mean relative increment of iteration k of layer l (k = 1..r_l)."""
    contraction: list[list[float]] = field(default_factory=list)
    """contraction[l][k-2]: the contraction estimate rho_k of layer l, k = 2..r_l (see analysis.convergence)."""
    refinement: list[float] = field(default_factory=list)
    """Mean ||z_r - z_1|| / ||z_1|| per layer (0 for layers with one iteration)."""
    cosine_drift: list[float] = field(default_factory=list)
    """Mean 1 - cos(z_r, z_1) per layer."""
    loss: float = float("nan")
    """Mean next-token loss of the full schedule on the calibration batches."""
    ablation: list[float] = field(default_factory=list)
    """Loss increase when the layer alone runs one iteration (filled by `ablation_influence`)."""

    def metric(self, name: str) -> list[float]:
        if name not in ("refinement", "cosine_drift", "ablation"):
            raise UserInputError(f"influence metric {name!r}; choose refinement, cosine_drift or ablation")
        values = getattr(self, name)
        if not values:
            raise UserInputError(f"influence metric {name!r} was not measured")
        return values


def _relative(a: Tensor, b: Tensor) -> Tensor:
    """Per-token ||a - b|| / ||b||."""
    return (a - b).float().norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-12)


@torch.no_grad()
def lm_loss(model, batches: list[Tensor]) -> float:
    """Mean next-token cross-entropy of a decoder-only model over windows (B, T + 1)."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(batch[:, :-1])
        total += next_token_loss(logits, batch, reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def iteration_stats(model, batches: list[Tensor], forward=None) -> IterationStats:
    """Observe every layer's iterates on the calibration windows and average the per-token measures.

    model: a `Decoder` (any object with an implicit `.update`, i.e. scheme iiet, and `forward(idx)`); batches:
    (B, T + 1) windows.
    forward: what to call for the logits, if not model (a sharded wrapper around it: `ODEModule.forward_module`).
    """
    update = model.update
    if not update.implicit or update.cfg.iiet.unit != "layer":
        raise UserInputError(
            f"iteration influence needs scheme 'iiet' with iiet.unit 'layer', not {update.cfg.scheme!r}/{update.cfg.iiet.unit!r}"
        )
    was_training = model.training
    model.eval()
    L = len(update.schedule)
    meter = ConvergenceMeter()
    ref_sum, cos_sum, loss_sum = [0.0] * L, [0.0] * L, 0.0

    def drift(layer: int, states: list[Tensor]) -> None:
        iterates = states[: update.schedule[layer] + 1]  # y, z_1..z_r (an extra "mean" output follows)
        z1, zr = iterates[1], iterates[-1]
        ref_sum[layer] += _relative(zr, z1).sum().item()
        cos_sum[layer] += (1 - F.cosine_similarity(zr.float(), z1.float(), dim=-1)).sum().item()

    try:
        for batch in batches:
            increments = meter.observer(update.schedule)

            def observe(layer: int, states: list[Tensor]) -> None:
                increments(layer, states)
                drift(layer, states)

            with update.trace(observe=observe):
                logits = (forward or model)(batch[:, :-1])
            loss_sum += next_token_loss(logits, batch, reduction="sum").item()
    finally:
        model.train(was_training)
    tokens = meter.tokens
    return IterationStats(
        schedule=list(update.schedule),
        increments=meter.increments(),
        contraction=meter.contraction(),
        refinement=[v / tokens for v in ref_sum],
        cosine_drift=[v / tokens for v in cos_sum],
        loss=loss_sum / tokens,
    )


@torch.no_grad()
def ablation_influence(model, batches: list[Tensor], stats: IterationStats) -> IterationStats:
    """Fill stats.ablation: for each layer, the calibration loss with that layer alone at one iteration, minus
    the full schedule's loss. Costs one evaluation pass per layer."""
    update, full = model.update, list(model.update.schedule)
    was_training = model.training
    model.eval()
    try:
        stats.ablation = []
        for layer in range(len(full)):
            if full[layer] == 1:
                stats.ablation.append(0.0)
                continue
            with update.scheduled(full[:layer] + [1] + full[layer + 1 :]):
                stats.ablation.append(lm_loss(model, batches) - stats.loss)
    finally:
        model.train(was_training)
    return stats


def normalized(values: list[float]) -> list[float]:
    """Divide by the maximum, so that a threshold in [0, 1] is scale-free (negative values count as 0)."""
    top = max(values)
    return [max(v, 0.0) / top if top > 0 else 0.0 for v in values]


def relative_compute(schedule: list[int], full: list[int]) -> float:
    """F-evaluations of the layer stack under `schedule`, as a fraction of those under `full`."""
    return sum(schedule) / sum(full)


def schedule_from_influence(
    influence: list[float], full: list[int], threshold: float | None = None, target_compute: float | None = None
) -> list[int]:
    """The iteration schedule that keeps a layer's iterations only where they matter.

    threshold t in [0, 1]: a layer keeps its full budget when its normalized influence is above t and drops to
    one iteration otherwise (t = 0 keeps every iteration, t = 1 keeps one iteration per layer).
    target_compute c: keep the most influential layers' iterations while the relative compute stays <= c.
    """
    if (threshold is None) == (target_compute is None):
        raise UserInputError("give exactly one of threshold and target_compute")
    if len(influence) != len(full):
        raise UserInputError(f"{len(influence)} influence values for {len(full)} layers")
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise UserInputError(f"threshold={threshold} must lie in [0, 1]")
        if threshold == 0.0:
            return list(full)
        return [r if v > threshold else 1 for r, v in zip(full, normalized(influence))]
    floor = relative_compute([1] * len(full), full)
    if not floor <= target_compute <= 1.0:
        raise UserInputError(
            f"target_compute={target_compute} must lie in [{floor:.3f}, 1] (one iteration everywhere .. all)"
        )
    schedule = [1] * len(full)
    for layer in sorted(range(len(full)), key=lambda i: -influence[i]):
        trial = schedule[:layer] + [full[layer]] + schedule[layer + 1 :]
        if relative_compute(trial, full) <= target_compute + 1e-9:
            schedule = trial
    return schedule
