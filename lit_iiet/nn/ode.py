"""Layer-update schemes: a Transformer layer as one step of an ODE solver for dy/dt = G(y).

G is a layer's residual branch (`Branch`), called as `G(z, e)`, where e numbers the F-evaluations of the layer so
that each gets its own KV-cache slot. Each scheme is a small nn.Module (a `Scheme`, chosen by name from `SCHEMES`)
whose `step(layer, y, G, ...)` is the whole update and which owns the scheme's parameters for every layer of a stack.

| scheme      | update                                                           | evaluations |
|-------------|------------------------------------------------------------------|-------------|
| euler       | y + G(y)                                                         | 1           |
| iiet        | z0 = y; z_k = y + G(z_{k-1}), k = 1..r; output z_r (Picard)      | r           |
| looped      | z0 = y; z_k = z_{k-1} + G(z_{k-1}), k = 1..r (weight-tied steps)   | r           |
| rk2         | F1 = G(y); F2 = G(y + F1); y + (F1 + F2) / 2                     | 2           |
| rk2_gated   | g = sigmoid(W[F1; F2] + b); y + g F1 + (1 - g) F2                | 2           |
| rk4         | classic fourth-order Runge-Kutta                                 | 4           |
| pcformer    | RK2 predictor with EMA coefficients + learnable multistep corrector | 3        |
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lit_iiet.errors import UserInputError, check_choices
from lit_iiet.nn.layers import KVCache, RMSNorm

Sublayer = Callable[[Tensor, int], Tensor]


class Branch:
    """G(z) of one layer: the sum of its sub-layer outputs, each sub-layer reading the running residual.

    For a decoder-only block, sublayers = [attention, FFN] gives G(z) = a + FFN(z + a) with a = Attn(z).
    `norm`, if given, is applied to G's output (PCformer's "RK norm"); `scale`, if given, multiplies it after that
    (the learned per-channel branch scale of `ODEConfig.branch_scale`, set by the scheme with `scaled`).
    """

    def __init__(
        self,
        sublayers: list[Sublayer],
        norm: nn.Module | None = None,
        checkpoint: bool = False,
        fill: Callable[[Tensor, int, Tensor], None] | None = None,
        decoding: bool = False,
    ) -> None:
        self.sublayers, self.norm, self.checkpoint = sublayers, norm, checkpoint
        self.scale: Tensor | None = None
        # Per-token early exit while decoding one token per row: `fill(z, e, rows)` writes the KV-cache slot e
        # of rows that stopped iterating, from their frozen state (exact mode), without evaluating G.
        self.fill, self.decoding = fill, decoding

    def scaled(self, scale: Tensor) -> "Branch":
        """This G with its output multiplied by `scale` (C,): a new Branch, this one is left as it is."""
        other = copy.copy(self)
        other.scale = scale
        return other

    def _output(self, out: Tensor) -> Tensor:
        out = out if self.norm is None else self.norm(out)
        return out if self.scale is None else out * self.scale

    def __call__(self, z: Tensor, e: int, rows: Tensor | None = None) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            # Activation checkpointing per F-evaluation: keep z only, recompute the branch in the backward pass.
            return torch.utils.checkpoint.checkpoint(self._evaluate, z, e, rows, use_reentrant=False)
        return self._evaluate(z, e, rows)

    def evaluate_rows(self, z: Tensor, e: int, rows: Tensor) -> Tensor:
        """G of the batch rows `rows` only, while decoding with per-token early exit: the first sub-layer (the
        self-attention, which writes cache slot e) runs on every row, so a stopped row's keys and values come from
        its frozen state exactly as `fill` would write them, and no row's cached prefix is gathered; the later
        sub-layers (the FFN) run on `rows` alone."""
        d = self.sublayers[0](z, e)
        out, h = d[rows], z[rows] + d[rows]
        for sublayer in self.sublayers[1:]:
            d = sublayer(h, e, rows)
            out, h = out + d, h + d
        return self._output(out)

    def _evaluate(self, z: Tensor, e: int, rows: Tensor | None = None) -> Tensor:
        """rows: the batch rows z holds when G runs on a compacted sub-batch (their KV-cache rows)."""
        out, h = None, z
        for sublayer in self.sublayers:
            d = sublayer(h, e) if rows is None else sublayer(h, e, rows)
            out = d if out is None else out + d
            h = h + d
        return self._output(out)


# --- configuration -------------------------------------------------------------------------------------------

SchemeName = Literal["euler", "iiet", "looped", "rk2", "rk2_gated", "rk4", "pcformer"]  # the keys of SCHEMES


@dataclass
class IIETConfig:
    """How scheme iiet iterates (`ode.iiet.*`); the other schemes refuse anything but these defaults."""

    output: Literal["last", "mean"] = "last"
    """Output the last iterate (plain fixed point) or y + the mean of the iterations' slopes."""
    damping: float = 1.0
    """Relaxation b in z <- (1 - b) z + b (y + G(z)); 1.0 is the plain fixed-point iteration. The fixed point does
    not depend on b; with b < 1 iteration 1 is the shortened explicit step y + b G(y)."""
    relaxation: Literal["fixed", "learned"] = "fixed"
    """fixed (damping for every layer) or learned (one relaxation b per layer, a parameter that starts at damping,
    so r = 1 equals euler at initialisation when damping is 1)."""
    solver: Literal["picard", "anderson"] = "picard"
    """picard (plain fixed-point iteration) or anderson (Anderson acceleration per token over the last
    anderson_memory evaluations: a better iterate from the same r evaluations of G; iteration 1 is unchanged)."""
    anderson_memory: int = 3
    """anderson solver: how many of the latest evaluations are mixed (>= 2)."""
    unit: Literal["layer", "sublayer"] = "layer"
    """Iterate the whole layer (attention + FFN together) or each sub-layer in turn."""
    policy: Literal["fixed", "residual", "router"] = "fixed"
    """How many iterations each token gets in a layer. fixed: the schedule. residual: a token stops once its
    relative increment ||z_k - z_(k-1)|| / ||z_(k-1)|| falls below threshold (no training needed). router: a learned
    per-layer router; it picks the top router_capacity of the tokens in training and sigmoid > 0.5 at inference.
    Increments are gated, z <- z + g (y + G(z) - z): g = 1 continues (for the router a straight-through gate whose
    gradient is the sigmoid's), g = 0 stops."""
    threshold: float | list[float] = 0.0
    """residual policy: the relative-increment threshold, one for every layer or one per layer (0: never stop)."""
    router_capacity: float = 0.5
    """router policy, training: the fraction of a batch's tokens that run each iteration after the first."""
    router_aux_weight: float = 1.0
    """router policy: weight of the BCE loss that teaches sigmoid > 0.5 to make the training-time choice causally."""
    early_exit_compaction: Literal["ffn", "all"] = "ffn"
    """adaptive policies, cached decoding: which sub-layers run on the still-active rows only. ffn: the FFN (the
    self-attention runs on every row, which also fills the stopped rows' cache slots without gathering any cached
    prefix); all: the whole layer, on the active rows and their gathered KV prefix. Both are exact."""
    kv_mode: Literal["exact", "shared"] = "exact"
    """KV cache: exact (one slot per iteration; stopped tokens' slots filled from their frozen state) or shared (one
    slot per layer from the first iteration, reused by the others: smaller and approximate, also in training)."""

    def __post_init__(self) -> None:
        check_choices(self, "iiet.")
        if not 0.0 < self.damping <= 1.0:
            raise UserInputError(f"iiet.damping={self.damping} must lie in (0, 1]")
        if not isinstance(self.anderson_memory, int) or self.anderson_memory < 2:
            raise UserInputError(f"iiet.anderson_memory={self.anderson_memory!r} must be an integer >= 2")
        if self.solver == "anderson" and (self.output != "last" or self.damping != 1.0 or self.relaxation != "fixed"):
            raise UserInputError(
                "iiet.solver='anderson' mixes its own iterates: it needs iiet.output 'last', iiet.damping 1.0 and "
                "iiet.relaxation 'fixed'"
            )
        if self.adaptive or self.kv_mode == "shared":
            what = f"iiet.policy={self.policy!r}" if self.adaptive else "iiet.kv_mode='shared'"
            plain = self.output == "last" and self.damping == 1.0 and self.relaxation == "fixed"
            if self.unit != "layer" or self.solver != "picard" or not plain:
                raise UserInputError(
                    f"{what} needs iiet.unit 'layer', iiet.output 'last', iiet.damping 1.0, iiet.relaxation 'fixed' "
                    "and iiet.solver 'picard'"
                )
        thresholds = [self.threshold] if isinstance(self.threshold, (int, float)) else list(self.threshold)
        if not thresholds or any(not isinstance(t, (int, float)) or t < 0 for t in thresholds):
            raise UserInputError(f"iiet.threshold={self.threshold!r}: thresholds must be numbers >= 0")
        if not 0.0 < self.router_capacity <= 1.0:
            raise UserInputError(f"iiet.router_capacity={self.router_capacity} must lie in (0, 1]")

    @property
    def adaptive(self) -> bool:
        return self.policy != "fixed"

    def thresholds(self, n_layers: int) -> list[float]:
        """The residual policy's per-layer thresholds."""
        if isinstance(self.threshold, (int, float)):
            return [float(self.threshold)] * n_layers
        if len(self.threshold) != n_layers:
            raise UserInputError(
                f"iiet.threshold {list(self.threshold)} has {len(self.threshold)} entries; the stack has {n_layers} layers"
            )
        return [float(t) for t in self.threshold]


@dataclass
class ODEConfig:
    """How each layer of a stack is integrated."""

    scheme: SchemeName = "euler"
    """Layer-update scheme: euler (vanilla), iiet, looped (r weight-tied explicit steps), rk2, rk2_gated, rk4 or
    pcformer."""
    iters: int | list[int] = 1
    """iiet and looped: iterations per layer, one int for every layer or a per-layer schedule (what IIAD prunes
    and two-stage training switches). The other schemes have a fixed number of evaluations and take 1."""
    branch_norm: bool = False
    """RMSNorm on every G output (PCformer's RK norm). Breaks iiet r = 1 == euler; off by default."""
    branch_scale: float | None = None
    """A learned per-channel scale of G's output, one vector per layer, starting at this value (LayerScale; e.g.
    0.1 makes every update start at a tenth of G); None: off. 1.0 is the plain layer at initialisation."""
    dropout_mask: Literal["evaluation", "layer"] = "evaluation"
    """Dropout of the sub-layer outputs: a fresh mask for every F-evaluation, or one mask per layer step that all
    its evaluations share (as deep-equilibrium models do: the iterations then solve one fixed-point problem).
    Attention-weight dropout draws a mask per evaluation either way."""
    iiet: IIETConfig = field(default_factory=IIETConfig)
    """scheme iiet: the solver, its output and damping, the per-token policy and the KV-cache mode."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.branch_scale is not None and not self.branch_scale > 0:
            raise UserInputError(f"branch_scale={self.branch_scale!r} must be a number > 0 or null")
        if isinstance(self.iiet, dict):
            self.iiet = IIETConfig(**self.iiet)
        iters = [self.iters] if isinstance(self.iters, int) else list(self.iters)
        bad = [r for r in iters if not isinstance(r, int) or r < 1]
        if bad or not iters:
            raise UserInputError(f"iters={self.iters!r}: every iteration count must be an integer >= 1")
        if not SCHEMES[self.scheme].iterated and iters != [1]:
            iterated = " and ".join(repr(name) for name, scheme in SCHEMES.items() if scheme.iterated)
            raise UserInputError(
                f"iters={self.iters!r} is only used by schemes {iterated}; scheme {self.scheme!r} takes iters=1"
            )
        if self.scheme != "iiet" and self.iiet != IIETConfig():
            changed = next(f"iiet.{k}={v!r}" for k, v in asdict(self.iiet).items() if v != asdict(IIETConfig())[k])
            raise UserInputError(f"{changed} is only used by scheme 'iiet'; scheme {self.scheme!r} takes the defaults")

    @property
    def adaptive(self) -> bool:
        return self.iiet.adaptive

    @property
    def shared_kv(self) -> bool:
        return self.iiet.kv_mode == "shared"

    def vanilla(self, n_layers: int) -> bool:
        """Whether every layer is exactly the plain pre-norm layer y + G(y), i.e. the stack is a Transformer++."""
        return SCHEMES[self.scheme].vanilla(self, n_layers) and not self.branch_norm and self.branch_scale is None

    def schedule(self, n_layers: int) -> list[int]:
        """The per-layer iteration budget [r_1, ..., r_L]."""
        if isinstance(self.iters, int):
            return [self.iters] * n_layers
        if len(self.iters) != n_layers:
            raise UserInputError(
                f"iteration schedule {list(self.iters)} has {len(self.iters)} entries; the stack has {n_layers} layers"
            )
        return list(self.iters)


# --- what a forward pass reports -----------------------------------------------------------------------------


@dataclass(eq=False)
class Trace:
    """What the forward passes of a stack report while its caller holds this open (`Scheme.trace`).

    The outputs describe the latest forward pass (`Scheme.begin` clears them): read them after the pass.
    """

    observe: Callable[[int, list[Tensor]], None] | None = None
    """fn(layer, states), called right after each layer with states = [y, z_1, ..., z_r] for iiet (plus the output
    when it is not z_r) and [y, y_next] otherwise. fn may reduce them at once, so that nothing of the whole stack
    has to be kept (convergence metrics at validation)."""
    record: bool = False
    """Keep every layer's states in `states`."""
    full_iterations: bool = False
    """Every token runs every iteration of the schedule with g = 1, whatever the adaptive policy: the
    full-iteration reference that agreement metrics compare with."""
    states: dict[int, list[Tensor]] = field(default_factory=dict)
    """With record: {layer: states}."""
    counts: dict[int, Tensor] = field(default_factory=dict)
    """Implicit schemes: each token's number of iterations in each layer, {layer: (B, T)}."""
    aux_terms: list[Tensor] = field(default_factory=list)
    """Router policy, training: the BCE term of every routed iteration (`Scheme.aux_loss` weighs them)."""

    def see(self, layer: int, states: list[Tensor]) -> None:
        if self.observe is not None:
            self.observe(layer, states)
        if self.record:
            self.states[layer] = states


# --- the schemes ---------------------------------------------------------------------------------------------


class Scheme(nn.Module):
    """A stack's layer update: `forward(layer, y, G)` is one layer's step from its input y with its branch G.

    One instance per stack holds the scheme's parameters for all the layers (`update.<name>` in checkpoints).
    Callers ask it what they need instead of comparing scheme names:

    - `iterated`: layer l evaluates G `schedule[l]` times, a budget that `set_schedule` changes (IIAD, two-stage);
    - `implicit`: the iterates z_1..z_r approach the implicit Euler step y_next = y + G(y_next): convergence
      meters and iteration influence apply, and traces get each token's iteration count;
    - `adaptive`: a per-token policy makes those counts vary (`Trace.full_iterations` gives the reference);
    - `stateful`: a layer reads what earlier layers of the same pass wrote (`begin`), so it cannot be recomputed
      alone (activation checkpointing per layer);
    - `evals`, `total_evals`, `slots`, `init_cache`, `flops`: its cost and its KV cache; `aux_loss`: its own
      training-loss term, if any.

    Per-forward outputs go to the traces that callers open (`trace`), never to attributes of the scheme.
    """

    iterated = False
    implicit = False
    adaptive = False
    stateful = False
    evals_per_layer = 1  # F-evaluations of a layer, for a scheme that is not iterated

    def __init__(self, cfg: ODEConfig, n_layers: int, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = cfg.schedule(n_layers)  # changed only through set_schedule() / scheduled()
        self._traces: list[Trace] = []  # opened and closed by trace()
        if cfg.branch_scale is not None:
            self.branch_scale = nn.Parameter(torch.full((n_layers, dim), float(cfg.branch_scale)))

    @classmethod
    def vanilla(cls, cfg: ODEConfig, n_layers: int) -> bool:
        """Whether every step under cfg is exactly y + G(y) (see ODEConfig.vanilla)."""
        return False

    def step(self, layer: int, y: Tensor, G: Branch, states: list[Tensor] | None, history) -> Tensor:
        """y_next of one layer. states: a list to append the iterates z_k to while someone observes them, else
        None; history: the state that `begin` started for this forward pass."""
        raise NotImplementedError

    def forward(self, layer: int, y: Tensor, G: Branch, history: list[Tensor] | None = None) -> Tensor:
        if self.cfg.branch_scale is not None:
            G = G.scaled(self.branch_scale[layer])
        observers = [trace for trace in self._traces if trace.observe is not None or trace.record]
        states = [y] if observers else None
        out = self.step(layer, y, G, states, history)
        if states is not None:
            if len(states) == 1 or states[-1] is not out:  # the output, unless it is already the last iterate
                states.append(out)
            for trace in observers:
                trace.see(layer, states)
        return out

    def begin(self, x: Tensor) -> list[Tensor] | None:
        """Start a forward pass whose stack input is x: the open traces start over, and the result is the state
        its layers share (`history` of forward: PCformer's layer history, None for the other schemes)."""
        for trace in self._traces:
            trace.states, trace.counts, trace.aux_terms = {}, {}, []
        return None

    @contextlib.contextmanager
    def trace(
        self,
        observe: Callable[[int, list[Tensor]], None] | None = None,
        record: bool = False,
        full_iterations: bool = False,
    ) -> Iterator[Trace]:
        """A `Trace` that every forward pass of this stack reports to while the context is open. Traces nest:
        each open one gets the reports, and one that asks for full iterations sets them for all."""
        trace = Trace(observe, record, full_iterations)
        self._traces.append(trace)
        try:
            yield trace
        finally:
            self._traces.remove(trace)

    def set_schedule(self, schedule: list[int]) -> None:
        """Change the per-layer iteration budget for good (IIAD's pruned student, two-stage training's stages)."""
        self.schedule = ODEConfig(self.cfg.scheme, list(schedule)).schedule(len(self.schedule))  # validated

    @contextlib.contextmanager
    def scheduled(self, schedule: list[int]) -> Iterator[None]:
        """Another schedule while the context is open (the ablation of one layer's iterations); restored after."""
        previous = self.schedule
        self.set_schedule(schedule)
        try:
            yield
        finally:
            self.schedule = previous

    def evals(self, layer: int) -> int:
        """F-evaluations of one layer (its most, under an adaptive policy)."""
        return self.schedule[layer] if self.iterated else self.evals_per_layer

    def total_evals(self) -> int:
        return sum(self.evals(layer) for layer in range(len(self.schedule)))

    def slots(self, layer: int) -> int:
        """KV-cache slots of one layer: one per evaluation, or one in the shared mode."""
        return 1 if self.cfg.shared_kv else self.evals(layer)

    def init_cache(self, batch: int, n_heads: int, max_len: int, head_dim: int, like: Tensor) -> list[list[KVCache]]:
        """An empty KV cache for the stack: one slot per (layer, F-evaluation), or one per layer in the shared mode
        (docs/DESIGN.md, section 3), on the device and in the dtype of `like`."""
        return [
            [KVCache(batch, n_heads, max_len, head_dim, like.device, like.dtype) for _ in range(self.slots(layer))]
            for layer in range(len(self.schedule))
        ]

    def flops(self, tokens: int) -> int:
        """Matmul FLOPs of the scheme itself (not of G) for `tokens` tokens through the whole stack."""
        return 0

    def aux_loss(self, trace: Trace) -> Tensor | None:
        """The scheme's own training-loss term, from the trace of a training forward pass; None if it has none."""
        return None


class Euler(Scheme):
    """The vanilla layer: one explicit Euler step."""

    @classmethod
    def vanilla(cls, cfg: ODEConfig, n_layers: int) -> bool:
        return True

    def step(self, layer, y, G, states, history):
        return y + G(y, 0)


class IIET(Scheme):
    """Iterative implicit Euler: r fixed-point iterations z_k = y + G(z_(k-1)) from z_0 = y towards the implicit
    step y_next = y + G(y_next); the output is z_r.

    `cfg.iiet` sets the solver (Picard, damped with a fixed or a learned per-layer relaxation, or Anderson), the
    output, the unit (the whole layer, or each sub-layer in turn), the per-token policy (fixed, or early exit by
    the residual or a learned router) and the KV-cache mode.
    """

    iterated = True
    implicit = True

    def __init__(self, cfg: ODEConfig, n_layers: int, dim: int) -> None:
        super().__init__(cfg, n_layers, dim)
        c = cfg.iiet
        if c.policy == "residual":
            self.thresholds = c.thresholds(n_layers)
        if c.policy == "router":
            self.routers = nn.ModuleList(nn.Linear(dim, 1) for _ in range(n_layers))
            for router in self.routers:  # start undecided (sigmoid = 0.5); the BCE term calibrates the threshold
                nn.init.zeros_(router.weight)
                nn.init.zeros_(router.bias)
        if c.relaxation == "learned":
            self.relaxation = nn.Parameter(torch.full((n_layers,), float(c.damping)))

    @property
    def adaptive(self) -> bool:
        return self.cfg.iiet.adaptive

    @classmethod
    def vanilla(cls, cfg: ODEConfig, n_layers: int) -> bool:
        one_step = cfg.iiet.damping == 1.0 and cfg.iiet.relaxation == "fixed"  # else iteration 1 is y + b G(y)
        return set(cfg.schedule(n_layers)) == {1} and one_step

    def step(self, layer, y, G, states, history):
        c, r = self.cfg.iiet, self.schedule[layer]
        if (c.adaptive or c.kv_mode == "shared") and not any(trace.full_iterations for trace in self._traces):
            out, counts = adaptive_fixed_point(
                y, G, r, self.decider(layer), not self.cfg.shared_kv, states, c.early_exit_compaction
            )
        else:
            damping = self.relaxation[layer] if c.relaxation == "learned" else c.damping
            if c.unit == "layer":
                out = self.solve(y, G, r, damping, states)
            else:  # each sub-layer's own implicit step in turn
                out = y
                for sublayer in G.sublayers:
                    out = self.solve(out, sublayer, r, damping, None)
            counts = torch.full(y.shape[:2], r, dtype=torch.long, device=y.device) if self._traces else None
        for trace in self._traces:
            trace.counts[layer] = counts
        return out

    def solve(self, y: Tensor, f: Sublayer, iters: int, damping: float | Tensor, states: list[Tensor] | None) -> Tensor:
        """`iters` iterations of the implicit step y_next = y + f(y_next) from y, by the configured solver."""
        c = self.cfg.iiet
        if c.solver == "anderson":
            return anderson(y, f, iters, c.anderson_memory, states)
        return fixed_point(y, f, iters, damping, c.output, states)

    def decider(self, layer: int):
        """The per-token continue/stop decision of a layer's adaptive policy: decide(k, z, z_prev, active)."""
        policy = self.cfg.iiet.policy

        def decide(k: int, z: Tensor, z_prev: Tensor, active: Tensor) -> tuple[Tensor, Tensor | None]:
            if policy == "fixed":
                return torch.ones(z.shape[:2], dtype=torch.bool, device=z.device), None
            if policy == "residual":
                increment = (z - z_prev).float().norm(dim=-1) / z_prev.float().norm(dim=-1).clamp_min(1e-12)
                return increment >= self.thresholds[layer], None
            logit = self.routers[layer](z).float()
            # Straight-through gate: exactly 1 for a token that continues (it runs the plain IIET iteration),
            # with the sigmoid's gradient, so the loss tells the router which tokens gain from iterating.
            prob = torch.sigmoid(logit)
            gate = (prob / prob.detach()).to(z.dtype)
            if not self.training:
                return logit[..., 0] > 0, gate
            # Expert choice: the top router_capacity of the batch's tokens, among those still active, run this
            # iteration (not causal); the BCE term teaches the causal rule sigmoid > 0.5 to pick the same tokens.
            n = min(max(1, round(self.cfg.iiet.router_capacity * logit.numel())), int(active.sum()))
            chosen = torch.zeros(logit.numel(), dtype=torch.bool, device=z.device)
            chosen[logit.flatten().masked_fill(~active.flatten(), float("-inf")).topk(n).indices] = True
            chosen = chosen.view(z.shape[:2])
            bce = F.binary_cross_entropy_with_logits(logit[..., 0], chosen.float())
            for trace in self._traces:
                trace.aux_terms.append(bce)
            return chosen, gate

        return decide

    def aux_loss(self, trace: Trace) -> Tensor | None:
        """The router's BCE over a training pass, weighted; it touches every router so DDP never finds one unused."""
        if self.cfg.iiet.policy != "router" or not self.training:
            return None
        unused_guard = sum(p.sum() for p in self.routers.parameters()) * 0.0
        terms = trace.aux_terms
        return unused_guard + (self.cfg.iiet.router_aux_weight * torch.stack(terms).mean() if terms else 0.0)


# IIET's solvers: plain functions of y and G, which the influence analysis also runs on its own.


def fixed_point(
    y: Tensor,
    f: Sublayer,
    iters: int,
    damping: float | Tensor = 1.0,
    output: str = "last",
    iterates: list[Tensor] | None = None,
) -> Tensor:
    """Picard iteration for the implicit Euler step y_next = y + f(y_next), starting from z0 = y.

    damping b relaxes each step: z <- (1 - b) z + b (y + f(z)) (a float, or a learned scalar tensor); the fixed
    point does not depend on b. output="mean" returns y + the mean of the r slopes f(z_0..z_{r-1}) instead of the
    last iterate; both reduce to explicit Euler at r = 1, b = 1.
    If `iterates` is a list, z_1..z_r are appended to it (influence analysis, hidden-state distillation).
    """
    plain = isinstance(damping, float) and damping == 1.0
    z, slope_sum = y, None
    for k in range(iters):
        slope = f(z, k)
        slope_sum = slope if slope_sum is None else slope_sum + slope
        z = y + slope if plain else (1 - damping) * z + damping * (y + slope)
        if iterates is not None:
            iterates.append(z)
    return y + slope_sum / iters if output == "mean" else z


def anderson(
    y: Tensor,
    f: Sublayer,
    iters: int,
    memory: int = 3,
    iterates: list[Tensor] | None = None,
    reg: float = 1e-4,
    max_step: float = 1.0,
) -> Tensor:
    """Anderson acceleration of the same fixed-point problem z = y + f(z), per token.

    Evaluation k computes g_k = y + f(z_k) and its residual r_k = g_k - z_k. The next iterate mixes the last
    `memory` evaluations, z_(k+1) = sum_i a_i g_i with sum_i a_i = 1 chosen to minimise ||sum_i a_i r_i|| (type-II
    Anderson with mixing 1, as deep-equilibrium models use; `reg` is a Tikhonov term relative to the residuals'
    scale). z_1 = g_0, so r = 1 is the vanilla layer. Each token mixes only its own history, so token t's state
    never depends on later tokens, and evaluation k still reads every token's input z_k: the KV cache keeps one
    exact slot per evaluation, as for Picard iteration.

    Safeguard: the mixing moves a token at most `max_step` times its last residual ||r_k|| away from g_k (a trust
    region: never further than another Picard step would go). Without it, nearly collinear residuals early in
    training give weights in the hundreds and training diverges (docs/RESULTS.md); inf disables it.
    """
    z, gs, rs = y, [], []
    for k in range(iters):
        g = y + f(z, k)
        gs, rs = (gs + [g])[-memory:], (rs + [g - z])[-memory:]
        z = g if len(gs) == 1 else g + _anderson_step(gs, rs, reg, max_step)
        if iterates is not None:
            iterates.append(z)
    return z


def _anderson_step(gs: list[Tensor], rs: list[Tensor], reg: float, max_step: float) -> Tensor:
    """sum_i a_i g_i - g_m for the affine weights a (sum 1) that minimise each token's ||sum_i a_i r_i||, capped.

    Written relative to the newest evaluation m: a = (gamma, 1 - sum gamma), so the residual is r_m + D gamma with
    D = [r_i - r_m], and gamma solves (D^T D + lambda I) gamma = -D^T r_m, in fp32 at least.
    """

    def wide(t: Tensor) -> Tensor:  # at least fp32 (bf16 / fp16 under autocast are too coarse for the solve)
        return t if t.dtype in (torch.float32, torch.float64) else t.float()

    r_last = wide(rs[-1])
    D = torch.stack([wide(r) - r_last for r in rs[:-1]], dim=-1)  # (..., C, m - 1)
    gram = D.transpose(-1, -2) @ D  # (..., m - 1, m - 1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    lam = reg * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1) + 1e-20
    gamma = torch.linalg.solve(gram + lam * eye, -(D.transpose(-1, -2) @ r_last.unsqueeze(-1)))  # (..., m - 1, 1)
    dg = torch.stack([wide(g - gs[-1]) for g in gs[:-1]], dim=-1)  # (..., C, m - 1)
    step = (dg @ gamma).squeeze(-1)
    if max_step != float("inf"):
        limit = max_step * r_last.norm(dim=-1, keepdim=True)
        step = step * (limit / step.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return step.to(gs[-1].dtype)


def adaptive_fixed_point(
    y: Tensor,
    G: Branch,
    iters: int,
    decide: Callable[[int, Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]],
    fill: bool = True,
    iterates: list[Tensor] | None = None,
    compact: str = "ffn",
) -> tuple[Tensor, Tensor]:
    """IIET with per-token early exit: the gated iteration z <- z + g (y + G(z) - z) while a token is active.

    Iteration 1 runs for every token (it is the vanilla layer). Before iteration k + 1, `decide(k, z, z_prev,
    active)` returns which tokens continue, (B, T) bool, and their gate g, (B, T, 1) or None for g = 1; a token that
    stops keeps its state for good. Returns the output and each token's number of iterations (B, T).

    A full-sequence pass computes G for every token and masks the update: every token's state then feeds the
    keys of the next evaluation, which is exactly what the KV cache's slot for that evaluation must hold. When
    decoding one token per row over the cache, the active rows are gathered into a dense sub-batch instead
    (saved evaluations become saved time) and, with `fill`, the stopped rows' cache slots are written from
    their frozen states (one key/value projection, no attention or FFN), so that later tokens see the same
    keys as in the full-sequence pass. compact="ffn" gathers only for the FFN: the self-attention runs on every
    row, which fills the stopped rows' slots and needs no gather of any row's cached prefix (see
    `Branch.evaluate_rows`; docs/RESULTS.md has the measurement that made it the default).
    """
    B, T, _ = y.shape
    z, z_prev, gate = y, y, None
    active = torch.ones(B, T, dtype=torch.bool, device=y.device)
    counts = torch.zeros(B, T, dtype=torch.long, device=y.device)
    for k in range(iters):
        if k > 0:
            keep, gate = decide(k, z, z_prev, active)
            active = active & keep
        z_prev = z
        if G.decoding and T == 1 and not bool(active.all()):
            rows, stopped = active[:, 0].nonzero().squeeze(1), (~active[:, 0]).nonzero().squeeze(1)
            if fill and G.fill is not None and (compact == "all" or not len(rows)):
                G.fill(z[stopped], k, stopped)
            if len(rows):
                za = z[rows]
                g = G(za, k, rows) if compact == "all" else G.evaluate_rows(z, k, rows)
                step = y[rows] + g - za
                z = z.index_copy(0, rows, za + (step if gate is None else gate[rows] * step))
        else:
            step = y + G(z, k) - z
            z = torch.where(active[..., None], z + (step if gate is None else gate * step), z)
        counts += active
        if iterates is not None:
            iterates.append(z)
    return z, counts


class Looped(Scheme):
    """r explicit Euler steps with the same weights (looped / Universal-Transformer blocks): IIET's compute per
    parameter without its anchor. IIET adds every slope to y, the layer input; this adds it to the last iterate."""

    iterated = True

    def step(self, layer, y, G, states, history):
        z = y
        for k in range(self.schedule[layer]):
            z = z + G(z, k)
            if states is not None:
                states.append(z)
        return z


class RK2(Scheme):
    """Heun's second-order Runge-Kutta step."""

    evals_per_layer = 2

    def step(self, layer, y, G, states, history):
        f1 = G(y, 0)
        f2 = G(y + f1, 1)
        return y + (f1 + f2) / 2


class RK2Gated(Scheme):
    """RK2 whose two stages are mixed by a learned per-token gate, one per layer (starting at plain RK2)."""

    evals_per_layer = 2

    def __init__(self, cfg: ODEConfig, n_layers: int, dim: int) -> None:
        super().__init__(cfg, n_layers, dim)
        self.gates = nn.ModuleList(nn.Linear(2 * dim, 1) for _ in range(n_layers))
        for gate in self.gates:  # start at g = 0.5, i.e. plain RK2
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)

    def step(self, layer, y, G, states, history):
        f1 = G(y, 0)
        f2 = G(y + f1, 1)
        g = torch.sigmoid(self.gates[layer](torch.cat((f1, f2), dim=-1)))
        return y + g * f1 + (1 - g) * f2

    def flops(self, tokens: int) -> int:
        return sum(2 * tokens * g.weight.numel() for g in self.gates)


class RK4(Scheme):
    """The classic fourth-order Runge-Kutta step."""

    evals_per_layer = 4

    def step(self, layer, y, G, states, history):
        f1 = G(y, 0)
        f2 = G(y + f1 / 2, 1)
        f3 = G(y + f2 / 2, 2)
        f4 = G(y + f3, 3)
        return y + (f1 + 2 * f2 + 2 * f3 + f4) / 6


class PCformer(Scheme):
    """Predictor-corrector: an RK2 predictor with EMA coefficients, then a learnable multistep corrector over the
    layer history (a DLCL-style weighted sum of earlier layers' outputs)."""

    stateful = True
    evals_per_layer = 3

    def __init__(self, cfg: ODEConfig, n_layers: int, dim: int) -> None:
        super().__init__(cfg, n_layers, dim)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        # Row l mixes history entries 0..l+1 (embedding, l earlier layers, this layer); start uniform.
        rows = torch.arange(n_layers).unsqueeze(1)
        uniform = (torch.arange(n_layers + 1) <= rows + 1).float() / (rows + 2).float()
        self.w_in = nn.Parameter(uniform.clone())
        self.w_out = nn.Parameter(uniform.clone())
        self.norm_p = nn.ModuleList(RMSNorm(dim) for _ in range(n_layers))
        self.norm_h = nn.ModuleList(RMSNorm(dim) for _ in range(n_layers))

    def begin(self, x: Tensor) -> list[Tensor]:
        super().begin(x)
        return [x]  # the layer history starts with the embedding output

    def step(self, layer, y, G, states, history):
        return self.correct(layer, history, self.predict(y, G), G)

    def predict(self, y: Tensor, G: Branch) -> Tensor:
        """RK2 with EMA coefficients: stage i of m weighted alpha (1 - alpha)^(m - i)."""
        f1 = G(y, 0)
        f2 = G(y + f1, 1)
        return y + self.alpha * (1 - self.alpha) * f1 + self.alpha * f2

    def correct(self, layer: int, history: list[Tensor], prediction: Tensor, G: Branch) -> Tensor:
        """history holds [embedding, N(y_1), ..., N(y_t)] and is extended in place with N(h), h the corrected
        state of this layer."""
        n = layer + 2
        w_in, w_out = self.w_in[layer, :n], self.w_out[layer, :n]
        history.append(self.norm_p[layer](prediction))
        c = sum(w * h for w, h in zip(w_in, history))
        h = c + G(c, 2)
        history[-1] = self.norm_h[layer](h)
        return sum(w * h for w, h in zip(w_out, history))


SCHEMES: dict[str, type[Scheme]] = {
    "euler": Euler,
    "iiet": IIET,
    "looped": Looped,
    "rk2": RK2,
    "rk2_gated": RK2Gated,
    "rk4": RK4,
    "pcformer": PCformer,
}
