"""Layer-update schemes: a Transformer layer as one step of an ODE solver for dy/dt = G(y).

G is a layer's residual branch (`Branch`). Each scheme is a small function `scheme(y, G, ...) -> y_next`; G is
called as `G(z, e)`, where e numbers the F-evaluations of the layer so that each gets its own KV-cache slot.

| scheme      | update                                                           | evaluations |
|-------------|------------------------------------------------------------------|-------------|
| euler       | y + G(y)                                                         | 1           |
| iiet        | z0 = y; z_k = y + G(z_{k-1}), k = 1..r; output z_r               | r           |
| rk2         | F1 = G(y); F2 = G(y + F1); y + (F1 + F2) / 2                     | 2           |
| rk2_gated   | g = sigmoid(W[F1; F2] + b); y + g F1 + (1 - g) F2                | 2           |
| rk4         | classic fourth-order Runge-Kutta                                 | 4           |
| pcformer    | RK2 predictor with EMA coefficients + learnable multistep corrector | 3        |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from lit_iiet.errors import UserInputError
from lit_iiet.nn.layers import RMSNorm

Sublayer = Callable[[Tensor, int], Tensor]


class Branch:
    """G(z) of one layer: the sum of its sub-layer outputs, each sub-layer reading the running residual.

    For a decoder-only block, sublayers = [attention, FFN] gives G(z) = a + FFN(z + a) with a = Attn(z).
    `norm`, if given, is applied to G's output (PCformer's "RK norm").
    """

    def __init__(self, sublayers: list[Sublayer], norm: nn.Module | None = None, checkpoint: bool = False) -> None:
        self.sublayers, self.norm, self.checkpoint = sublayers, norm, checkpoint

    def __call__(self, z: Tensor, e: int) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            # Activation checkpointing per F-evaluation: keep z only, recompute the branch in the backward pass.
            return torch.utils.checkpoint.checkpoint(self._evaluate, z, e, use_reentrant=False)
        return self._evaluate(z, e)

    def _evaluate(self, z: Tensor, e: int) -> Tensor:
        out, h = None, z
        for sublayer in self.sublayers:
            d = sublayer(h, e)
            out = d if out is None else out + d
            h = h + d
        return out if self.norm is None else self.norm(out)


# --- the schemes -------------------------------------------------------------------------------------------


def euler(y: Tensor, G: Branch) -> Tensor:
    return y + G(y, 0)


def fixed_point(
    y: Tensor, f: Sublayer, iters: int, damping: float = 1.0, output: str = "last", iterates: list[Tensor] | None = None
) -> Tensor:
    """Picard iteration for the implicit Euler step y_next = y + f(y_next), starting from z0 = y.

    damping b < 1 relaxes each step: z <- (1 - b) z + b (y + f(z)). output="mean" returns y + the mean of the
    r slopes f(z_0..z_{r-1}) instead of the last iterate; both reduce to explicit Euler at r = 1, b = 1.
    If `iterates` is a list, z_1..z_r are appended to it (influence analysis, hidden-state distillation).
    """
    z, slope_sum = y, None
    for k in range(iters):
        slope = f(z, k)
        slope_sum = slope if slope_sum is None else slope_sum + slope
        z = y + slope if damping == 1.0 else (1 - damping) * z + damping * (y + slope)
        if iterates is not None:
            iterates.append(z)
    return y + slope_sum / iters if output == "mean" else z


def iiet(
    y: Tensor, G: Branch, iters: int, damping: float = 1.0, output: str = "last", unit: str = "layer",
    iterates: list[Tensor] | None = None,
) -> Tensor:
    """Iterative implicit Euler. unit="sublayer" iterates each sub-layer's own implicit step in turn."""
    if unit == "layer":
        return fixed_point(y, G, iters, damping, output, iterates)
    h = y
    for sublayer in G.sublayers:
        h = fixed_point(h, sublayer, iters, damping, output)
    return h


def rk2(y: Tensor, G: Branch) -> Tensor:
    f1 = G(y, 0)
    f2 = G(y + f1, 1)
    return y + (f1 + f2) / 2


def rk2_gated(y: Tensor, G: Branch, gate: nn.Linear) -> Tensor:
    f1 = G(y, 0)
    f2 = G(y + f1, 1)
    g = torch.sigmoid(gate(torch.cat((f1, f2), dim=-1)))
    return y + g * f1 + (1 - g) * f2


def rk4(y: Tensor, G: Branch) -> Tensor:
    f1 = G(y, 0)
    f2 = G(y + f1 / 2, 1)
    f3 = G(y + f2 / 2, 2)
    f4 = G(y + f3, 3)
    return y + (f1 + 2 * f2 + 2 * f3 + f4) / 6


def pcformer_predictor(y: Tensor, G: Branch, alpha: Tensor) -> Tensor:
    """RK2 predictor with EMA coefficients: stage i of m weighted alpha (1 - alpha)^(m - i)."""
    f1 = G(y, 0)
    f2 = G(y + f1, 1)
    return y + alpha * (1 - alpha) * f1 + alpha * f2


def pcformer_corrector(
    history: list[Tensor], prediction: Tensor, G: Branch, w_in: Tensor, w_out: Tensor, norm_p: nn.Module, norm_h: nn.Module
) -> Tensor:
    """Learnable multistep corrector over the layer history (a DLCL-style weighted sum of earlier outputs).

    history holds [embedding, N(y_1), ..., N(y_t)] and is extended in place with N(h), h the corrected state.
    """
    history.append(norm_p(prediction))
    c = sum(w * h for w, h in zip(w_in, history))
    h = c + G(c, 2)
    history[-1] = norm_h(h)
    return sum(w * h for w, h in zip(w_out, history))


# --- configuration and the per-stack update ------------------------------------------------------------------

FIXED_EVALS = {"euler": 1, "rk2": 2, "rk2_gated": 2, "rk4": 4, "pcformer": 3}
SCHEMES = ("euler", "iiet", "rk2", "rk2_gated", "rk4", "pcformer")


@dataclass
class ODEConfig:
    """How each layer of a stack is integrated."""

    scheme: str = "euler"
    """Layer-update scheme: euler (vanilla), iiet, rk2, rk2_gated, rk4 or pcformer."""
    iters: int | list[int] = 1
    """iiet only: fixed-point iterations per layer, one int for every layer or a per-layer schedule."""
    iiet_output: str = "last"
    """iiet only: output the last iterate (plain fixed point) or y + the mean of the iterations' slopes."""
    iiet_damping: float = 1.0
    """iiet only: relaxation b in z <- (1 - b) z + b (y + G(z)); 1.0 is the plain fixed-point iteration."""
    iiet_unit: str = "layer"
    """iiet only: iterate the whole layer (attention + FFN together) or each sub-layer in turn."""
    branch_norm: bool = False
    """RMSNorm on every G output (PCformer's RK norm). Breaks iiet r = 1 == euler; off by default."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UserInputError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        iters = [self.iters] if isinstance(self.iters, int) else list(self.iters)
        bad = [r for r in iters if not isinstance(r, int) or r < 1]
        if bad or not iters:
            raise UserInputError(f"iters={self.iters!r}: every iteration count must be an integer >= 1")
        if self.scheme != "iiet" and iters != [1]:
            raise UserInputError(f"iters={self.iters!r} is only used by scheme 'iiet'; scheme {self.scheme!r} takes iters=1")
        if self.iiet_output not in ("last", "mean"):
            raise UserInputError(f"iiet_output={self.iiet_output!r}; choose 'last' or 'mean'")
        if self.iiet_unit not in ("layer", "sublayer"):
            raise UserInputError(f"iiet_unit={self.iiet_unit!r}; choose 'layer' or 'sublayer'")
        if not 0.0 < self.iiet_damping <= 1.0:
            raise UserInputError(f"iiet_damping={self.iiet_damping} must lie in (0, 1]")

    def schedule(self, n_layers: int) -> list[int]:
        """The per-layer iteration budget [r_1, ..., r_L]."""
        if isinstance(self.iters, int):
            return [self.iters] * n_layers
        if len(self.iters) != n_layers:
            raise UserInputError(f"iteration schedule {list(self.iters)} has {len(self.iters)} entries; the stack has {n_layers} layers")
        return list(self.iters)


class LayerUpdate(nn.Module):
    """Applies a stack's scheme layer by layer and holds the scheme's own parameters (gates, PCformer weights)."""

    def __init__(self, cfg: ODEConfig, n_layers: int, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = cfg.schedule(n_layers)
        # Set to {} to record, per layer, its input and states: [y, z_1, ..., z_r] for iiet, [y, y_next] otherwise.
        self.recording: dict[int, list[Tensor]] | None = None
        if cfg.scheme == "rk2_gated":
            self.gates = nn.ModuleList(nn.Linear(2 * dim, 1) for _ in range(n_layers))
            for gate in self.gates:  # start at g = 0.5, i.e. plain RK2
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)
        if cfg.scheme == "pcformer":
            self.alpha = nn.Parameter(torch.tensor(0.5))
            # Row l mixes history entries 0..l+1 (embedding, l earlier layers, this layer); start uniform.
            rows = torch.arange(n_layers).unsqueeze(1)
            uniform = (torch.arange(n_layers + 1) <= rows + 1).float() / (rows + 2).float()
            self.w_in = nn.Parameter(uniform.clone())
            self.w_out = nn.Parameter(uniform.clone())
            self.norm_p = nn.ModuleList(RMSNorm(dim) for _ in range(n_layers))
            self.norm_h = nn.ModuleList(RMSNorm(dim) for _ in range(n_layers))

    def evals(self, layer: int) -> int:
        """F-evaluations (and KV-cache slots) of one layer."""
        return self.schedule[layer] if self.cfg.scheme == "iiet" else FIXED_EVALS[self.cfg.scheme]

    def total_evals(self) -> int:
        return sum(self.evals(layer) for layer in range(len(self.schedule)))

    def flops(self, tokens: int) -> int:
        """Matmul FLOPs of the scheme itself (rk2 gates) for `tokens` tokens through the whole stack."""
        return sum(2 * tokens * g.weight.numel() for g in self.gates) if self.cfg.scheme == "rk2_gated" else 0

    def begin(self, x: Tensor) -> list[Tensor] | None:
        """Per-forward state: PCformer's layer history starts with the embedding output."""
        return [x] if self.cfg.scheme == "pcformer" else None

    def forward(self, layer: int, y: Tensor, G: Branch, history: list[Tensor] | None = None) -> Tensor:
        s, states = self.cfg.scheme, [y] if self.recording is not None else None
        if s == "euler":
            out = euler(y, G)
        elif s == "iiet":
            c = self.cfg
            out = iiet(y, G, self.schedule[layer], c.iiet_damping, c.iiet_output, c.iiet_unit, states)
        elif s == "rk2":
            out = rk2(y, G)
        elif s == "rk2_gated":
            out = rk2_gated(y, G, self.gates[layer])
        elif s == "rk4":
            out = rk4(y, G)
        else:
            prediction = pcformer_predictor(y, G, self.alpha)
            n = layer + 2
            out = pcformer_corrector(
                history, prediction, G, self.w_in[layer, :n], self.w_out[layer, :n], self.norm_p[layer], self.norm_h[layer]
            )
        if states is not None:
            if len(states) == 1 or states[-1] is not out:  # the output, unless it is already the last iterate
                states.append(out)
            self.recording[layer] = states
        return out
