"""Gradient norms per layer and per iteration: where the training signal goes in an iterated stack."""

from __future__ import annotations

import contextlib
import re

import torch
from lightning.pytorch.callbacks import Callback

from lit_iiet.nn.ode import Scheme

# A stack's layers are model.<stack>.<layer>; its update module is model.<prefix>update. Tags name layers as the
# convergence metrics do: "enc0", "dec1" in an encoder-decoder, "0", "1" in a decoder-only model.
STACKS = {"encoder": ("enc", "enc_update"), "decoder": ("dec", "dec_update"), "blocks": ("", "update")}
LAYER = re.compile(r"^(encoder|decoder|blocks)\.(\d+)\.")


class GradientNorms(Callback):
    """Every N optimizer steps, after the backward pass (before clipping):

    - `grad/<layer>`: the L2 norm of the gradient of that layer's block parameters (for an iterated layer, the sum
      over its evaluations, which share the weights);
    - `grad/<layer>/z<k>`: the L2 norm of the loss's gradient with respect to the layer's state z_k (k = 0 is its
      input y, k = 1..r the iterates; the last one is the layer's output), for every scheme.

    <layer> is `enc<l>` / `dec<l>` in an encoder-decoder and `<l>` in a decoder-only model. The iterate gradients
    come from hooks registered through `Scheme.trace` during the logged steps only.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        """
        Args:
            every_n_steps: Log at optimizer steps 0, N, 2N, ...
        """
        self.every = every_n_steps
        self._stack: contextlib.ExitStack | None = None
        self._norms: dict[str, torch.Tensor] = {}

    def _updates(self, pl_module) -> list[tuple[str, Scheme]]:
        model = pl_module.model
        return [
            (prefix, getattr(model, name))
            for prefix, name in STACKS.values()
            if isinstance(getattr(model, name, None), Scheme)
        ]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every:
            return
        self._norms, self._stack = {}, contextlib.ExitStack()
        for prefix, update in self._updates(pl_module):
            self._stack.enter_context(update.trace(observe=self._hook_states(prefix)))

    def _hook_states(self, prefix: str):
        def observe(layer: int, states: list[torch.Tensor]) -> None:
            for k, z in enumerate(states):
                if z.requires_grad:
                    tag = f"grad/{prefix}{layer}/z{k}"
                    z.register_hook(lambda g, tag=tag: self._norms.__setitem__(tag, g.detach().float().norm()))

        return observe

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._stack is None:
            return
        self._stack.close()
        self._stack = None
        squares: dict[str, torch.Tensor] = {}
        for name, p in pl_module.model.named_parameters():
            match = LAYER.match(name)
            if match and p.grad is not None:
                tag = f"grad/{STACKS[match[1]][0]}{match[2]}"
                squares[tag] = squares.get(tag, 0.0) + p.grad.detach().float().pow(2).sum()
        metrics = {**{tag: s.sqrt() for tag, s in squares.items()}, **self._norms}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)
