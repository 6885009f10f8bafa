"""Does each layer's fixed-point iteration converge? Per-(layer, iteration) measurements of an IIET stack.

For a layer with input y = z_0 and iterates z_1..z_r (z_1 is the vanilla layer's output), per token:

  increment k    ||z_k - z_(k-1)|| / ||z_(k-1)||        k = 1 is the vanilla update's relative size
  step k         ||z_k - z_(k-1)||

and per layer and iteration k >= 2 the contraction estimate

  rho_k = mean_tokens step k / mean_tokens step (k - 1)

For Picard iteration step k = ||Phi(z_(k-1)) - Phi(z_(k-2))|| with Phi(z) = y + G(z), so rho_k is the Lipschitz
constant of Phi measured along the iteration's own path: below 1 the iteration contracts towards the implicit
Euler solution, at or above 1 it does not (and the layer is then not computing implicit Euler at all). The
convergence metrics that validation logs, the influence analysis and the notebook all come from here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class ConvergenceMeter:
    """Sums the per-token measures over the tokens of many batches; `observer()` plugs into `Scheme.trace`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens = 0.0
        self.increment_sum: dict[tuple[int, int], Tensor] = {}
        self.step_sum: dict[tuple[int, int], Tensor] = {}

    def observer(self, schedule: list[int], mask: Tensor | None = None) -> Callable[[int, list[Tensor]], None]:
        """fn(layer, states) for `Scheme.trace(observe=...)` over one forward pass with the iteration `schedule`;
        mask (B, T) bool keeps only real tokens (not padding)."""
        counted = [False]

        def observe(layer: int, states: list[Tensor]) -> None:
            iterates = states[: schedule[layer] + 1]  # y, z_1..z_r (an extra "mean" output may follow)
            weight = None if mask is None else mask.to(iterates[0].dtype)
            if not counted[0]:  # every layer sees the same tokens: count them once per forward pass
                self.tokens += float(iterates[0].shape[0] * iterates[0].shape[1] if mask is None else mask.sum())
                counted[0] = True
            for k in range(1, len(iterates)):
                step = (iterates[k] - iterates[k - 1]).float().norm(dim=-1)
                relative = step / iterates[k - 1].float().norm(dim=-1).clamp_min(1e-12)
                if weight is not None:
                    step, relative = step * weight, relative * weight
                key = (layer, k)
                self.increment_sum[key] = self.increment_sum.get(key, 0.0) + relative.sum().detach()
                self.step_sum[key] = self.step_sum.get(key, 0.0) + step.sum().detach()

        return observe

    def _rows(self, sums: dict[tuple[int, int], Tensor]) -> list[list[float]]:
        layers = max((l for l, _ in sums), default=-1) + 1
        return [[float(v) for (l2, _), v in sorted(sums.items()) if l2 == l] for l in range(layers)]

    def increments(self) -> list[list[float]]:
        """increments[l][k - 1]: mean relative increment of iteration k of layer l."""
        return [[v / max(self.tokens, 1.0) for v in row] for row in self._rows(self.increment_sum)]

    def contraction(self) -> list[list[float]]:
        """contraction[l][k - 2]: rho_k of layer l for k = 2..r (empty for a layer with one iteration)."""
        return [[b / a if a > 0 else float("nan") for a, b in zip(row, row[1:])] for row in self._rows(self.step_sum)]

    def metrics(self, stack: str = "") -> dict[str, float]:
        """TensorBoard scalars: iiet/increment/<stack><layer>/<k> and iiet/contraction/<stack><layer> (last k)."""
        out = {}
        for l, row in enumerate(self.increments()):
            out.update({f"iiet/increment/{stack}{l}/{k}": v for k, v in enumerate(row, 1)})
        for l, row in enumerate(self.contraction()):
            if row:
                out[f"iiet/contraction/{stack}{l}"] = row[-1]
        return out


@torch.no_grad()
def solver_residuals(model, batches: list[Tensor], max_evals: int = 6, memory: int = 3) -> dict[str, list[list[float]]]:
    """How close each solver gets to the implicit Euler step, per layer of a trained `Decoder`, per number of G
    evaluations: {solver: residual[l][n - 1]}, the mean over tokens of ||y + G(z) - z|| / ||z|| for the solver's
    output z after n = 1..max_evals evaluations, y being the layer's input in the model's own forward pass.

    This residual is what the implicit step drives to 0; measuring it costs one more evaluation of G per point.
    Solvers: "picard" (plain fixed-point iteration) and "anderson" (with `memory`).
    """
    from lit_iiet.nn.ode import anderson, fixed_point

    was_training = model.training
    model.eval()
    solvers = {"picard": lambda y, G, n: fixed_point(y, G, n), "anderson": lambda y, G, n: anderson(y, G, n, memory)}
    sums = {name: [[0.0] * max_evals for _ in model.blocks] for name in solvers}
    tokens = 0
    try:
        for batch in batches:
            idx = batch[:, :-1]
            with model.update.trace(record=True) as trace:
                model(idx)
            states = trace.states
            T = idx.shape[1]
            tokens += idx.numel()
            for layer, block in enumerate(model.blocks):
                G, y = block.branch(model.rope_cos[:T], model.rope_sin[:T], None, 0), states[layer][0]
                for name, solve in solvers.items():
                    for n in range(1, max_evals + 1):
                        z = solve(y, G, n)
                        residual = (y + G(z, 0) - z).float().norm(dim=-1) / z.float().norm(dim=-1).clamp_min(1e-12)
                        sums[name][layer][n - 1] += residual.sum().item()
    finally:
        model.train(was_training)
    return {name: [[v / tokens for v in row] for row in rows] for name, rows in sums.items()}
