"""LightningModule for decoder-only language modelling with any layer-update scheme."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lit_iiet.analysis.convergence import ConvergenceMeter
from lit_iiet.errors import UserInputError
from lit_iiet.media import log_histogram, log_text
from lit_iiet.models.base import ODEModule, as_config, check_adam_options
from lit_iiet.nn.decoder import Decoder, DecoderConfig, check_checkpointing, next_token_loss
from lit_iiet.nn.generate import generate
from lit_iiet.nn.ode import ODEConfig


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to min_lr_ratio * lr over the run's optimizer steps."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to weight matrices only (not norms, biases or scheme coefficients)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    total_steps: int | None = None
    """Optimizer steps the schedule spans; None means the trainer's (max_steps or epochs x batches)."""

    def __post_init__(self) -> None:
        check_adam_options(self)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserInputError(f"model.optim.min_lr_ratio={self.min_lr_ratio}: must lie in [0, 1]")
        if self.total_steps is not None and self.total_steps < 1:
            raise UserInputError(f"model.optim.total_steps={self.total_steps}: must be >= 1 or null")


@dataclass
class SamplingConfig:
    """How `predict` and the validation sample continue a prompt."""

    max_new_tokens: int = 200
    """Tokens to generate."""
    temperature: float = 0.8
    """Softmax temperature; 0 is greedy decoding."""
    top_k: int | None = 50
    """Sample among the k most likely tokens (None: all)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (None: off)."""


# An extra training-loss function (see LanguageModel.add_loss_terms): (batch, logits, states) -> {name: (value, weight)}.
LossTerms = Callable[[Tensor, Tensor, dict[int, list[Tensor]]], dict[str, tuple[Tensor, float]]]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at an optimizer step: linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LanguageModel(ODEModule):
    """Next-token prediction with a Transformer++ whose layers follow the chosen ODE scheme."""

    # See ODEModule: sampling, and how an IIET runs its iterations at inference (policy, threshold, cache).
    runtime_options = (
        "sampling",
        "val_sample_prompt",
        "ode.iiet.policy",
        "ode.iiet.threshold",
        "ode.iiet.early_exit_compaction",
        "ode.iiet.kv_mode",
    )
    checkpoint_keys = ("arch", "ode")  # see ODEModule

    def __init__(
        self,
        arch: DecoderConfig = DecoderConfig(),
        ode: ODEConfig = ODEConfig(),
        optim: OptimConfig = OptimConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        init_from: str | None = None,
        val_sample_prompt: str | None = None,
        activation_checkpointing: Literal["none", "layer", "iteration"] = "none",
        compile: bool = False,
    ) -> None:
        """
        Args:
            arch: Shape of the Transformer++ (layers, width, heads, vocabulary, context length).
            ode: Layer-update scheme, iteration schedule and, under `iiet`, how IIET iterates.
            optim: Optimizer and learning-rate schedule.
            sampling: Generation settings for `predict` and the validation sample.
            init_from: Checkpoint whose weights initialise the model before `fit` (e.g. a vanilla checkpoint
                into an IIET model). Unlike --ckpt_path it restores no optimizer state or step count.
            val_sample_prompt: If set, generate from this prompt after each validation and log the text.
            activation_checkpointing: Trade compute for memory in training: "none"; "layer" keeps each layer's
                input and recomputes the whole layer (all its evaluations) in the backward pass; "iteration" keeps
                each F-evaluation's input and recomputes one G at a time (works for every scheme, pcformer too).
            compile: Compile the model with torch.compile (in place: checkpoints keep their keys).
        """
        super().__init__()
        arch, ode = as_config(DecoderConfig, arch), as_config(ODEConfig, ode)
        self.optim, self.sampling = as_config(OptimConfig, optim), as_config(SamplingConfig, sampling)
        self.init_from, self.val_sample_prompt = init_from, val_sample_prompt
        self.model = Decoder(arch, ode)
        check_checkpointing(activation_checkpointing, self.model.update)
        self.activation_checkpointing, self.compile_model = activation_checkpointing, compile
        self.save_configs(arch=arch, ode=ode, optim=self.optim, sampling=self.sampling)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        # Iterations per token (mean over layers) and, for adaptive policies, agreement with full iteration.
        self.val_evals, self.val_agreement = MeanMetric(), MeanMetric()
        self._val_evals_hist: list[Tensor] = []
        # Per layer and iteration: relative increments and the contraction estimate (iiet/increment/..., iiet/contraction/...).
        self.convergence = ConvergenceMeter()
        self._loss_terms: list[tuple[LossTerms, bool]] = []  # see add_loss_terms

    # --- setup ---------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.check_vocab(getattr(self.datamodule, "tokenizer", None), self.model.cfg.vocab_size)
        seq_len = getattr(getattr(self.datamodule, "hparams", None), "seq_len", None)
        if seq_len is not None and seq_len > self.model.cfg.max_seq_len:
            raise UserInputError(
                f"data.seq_len={seq_len} is longer than model.arch.max_seq_len={self.model.cfg.max_seq_len}"
            )
        super().setup(stage)

    def configure_model(self) -> None:
        if self.compile_model and self.model._compiled_call_impl is None:  # configure_model may run more than once
            self.model.compile()

    def configure_optimizers(self):
        o = self.optim
        optimizer = torch.optim.AdamW(self.param_groups(o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        total = o.total_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise UserInputError(
                "set trainer.max_steps, trainer.max_epochs or model.optim.total_steps for the LR schedule"
            )
        total = int(total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, o.warmup_steps, total, o.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- steps ---------------------------------------------------------------------------------------------

    def forward(self, idx: Tensor, cache=None, pos: int = 0, last_only: bool = False) -> Tensor:
        """The Decoder's forward, so that generation can run through a wrapper of this module (`forward_module`)."""
        return self.model(idx, cache, pos, last_only)

    def init_cache(self, batch: int, max_len: int | None = None):
        return self.model.init_cache(batch, max_len)

    def loss(self, batch: Tensor) -> Tensor:
        logits = self.model(batch[:, :-1])
        return next_token_loss(logits, batch)

    def add_loss_terms(self, fn: LossTerms, hidden_states: bool = False) -> None:
        """Add terms to the training loss (IIAD's distillation). After the model's forward pass, every training
        step calls fn(batch, logits, states): batch the (B, T + 1) windows, logits the model's (B, T, V), states
        {layer: [input, iterates..., output]} of every layer if hidden_states, else {}. fn returns
        {name: (value, weight)}: the loss gains weight * value, and train/<name> logs the value."""
        self._loss_terms.append((fn, hidden_states))

    def remove_loss_terms(self, fn: LossTerms) -> None:
        self._loss_terms = [(f, states) for f, states in self._loss_terms if f != fn]

    def loss_terms(self, batch: Tensor) -> dict[str, Tensor]:
        """The training loss ("loss") and its parts: "ce", the next-token cross-entropy; the terms of
        `add_loss_terms`; "router_aux", the router policy's BCE."""
        update = self.model.update
        with update.trace(record=any(states for _, states in self._loss_terms)) as trace:
            logits = self.model(batch[:, :-1], checkpointing=self.activation_checkpointing)
        terms = {"ce": next_token_loss(logits, batch)}
        loss = terms["ce"]
        for fn, _ in self._loss_terms:
            for name, (value, weight) in fn(batch, logits, trace.states).items():
                terms[name], loss = value, loss + weight * value
        aux = update.aux_loss(trace)
        if aux is not None:
            terms["router_aux"], loss = aux, loss + aux
        terms["loss"] = loss
        return terms

    def set_schedule(self, schedule: list[int]) -> None:
        """Run with this per-layer iteration schedule from now on, and keep it as the hyperparameter `ode.iters`,
        so that checkpoints rebuild the model with it (IIAD's pruned student)."""
        self.model.update.set_schedule(schedule)
        self.hparams["ode"] = {**self.hparams["ode"], "iters": list(schedule)}

    def forward_flops(self, batch: Tensor) -> int:
        return self.model.flops(batch.shape[0], batch.shape[1] - 1)

    def batch_tokens(self, batch: Tensor) -> int:
        return (batch.shape[1] - 1) * batch.shape[0]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        terms = self.loss_terms(batch)
        # Each part of the loss, and the CE alone when terms were added to it (else train/loss is the CE).
        parts = {name: value for name, value in terms.items() if name != "loss" and (name != "ce" or self._loss_terms)}
        if parts:
            self.log_dict({f"train/{name}": value for name, value in parts.items()}, sync_dist=True)
        self.log("train/loss", terms["loss"], prog_bar=True, sync_dist=True)  # the global batch's loss under DDP
        return terms["loss"]

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        update = self.model.update
        # How every layer's fixed-point iteration converges, reduced on the fly.
        observe = self.convergence.observer(update.schedule) if update.implicit else None
        with update.trace(observe=observe) as trace:
            logits = self.model(batch[:, :-1])
        loss = next_token_loss(logits, batch)
        self.val_loss.update(loss, weight=batch.shape[0])
        if not update.implicit:
            return
        per_token = torch.stack(list(trace.counts.values())).float().mean(0)  # (B, T), mean over layers
        self.val_evals.update(per_token.mean(), weight=per_token.numel())
        self._val_evals_hist.append(per_token.flatten().cpu())
        if update.adaptive:
            with update.trace(full_iterations=True):
                full = self.model(batch[:, :-1])
            agree = (logits.argmax(-1) == full.argmax(-1)).float().mean()
            self.val_agreement.update(agree, weight=per_token.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True, sync_dist=False)
        update = self.model.update
        if update.implicit and self.val_evals.update_count:
            self.log("iiet/evals_per_token", self.val_evals.compute())
            self.log_dict(self.convergence.metrics(), sync_dist=True)
            if update.adaptive:
                self.log("iiet/agreement", self.val_agreement.compute())
            if not self.trainer.sanity_checking:
                log_histogram(self.trainer, "iiet/evals_per_token", torch.cat(self._val_evals_hist), self.global_step)
        else:
            self.log("iiet/evals_per_token", update.total_evals() / self.model.cfg.n_layers)
        self.val_evals.reset()
        self.val_agreement.reset()
        self.convergence.reset()
        self._val_evals_hist.clear()
        if self.val_sample_prompt is not None and not self.trainer.sanity_checking:
            # Every rank samples (a sharded model's forward needs them all), with the same seed, so every rank
            # draws the same tokens and stops at the same step; the training RNG stream is left untouched.
            generator = torch.Generator(self.device).manual_seed(self.global_step)
            text = self.sample(self.val_sample_prompt, generator, self.forward_module())
            log_text(self.trainer, "val/sample", text, self.global_step, markdown=False)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self.test_loss.update(self.loss(batch), weight=batch.shape[0])

    def on_test_epoch_end(self) -> None:
        loss = self.test_loss.compute()
        self.test_loss.reset()
        self.log_dict({"test/loss": loss, "test/ppl": loss.exp()})

    # --- generation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompt: str, generator: torch.Generator | None = None, model=None) -> str:
        """Continue a text prompt with the sampling settings and `tokenizer`: the data module's in a Trainer, or,
        without one, the checkpoint's (`LanguageModel.from_checkpoint(path).sample("ROMEO:")`).

        model: what runs the forward passes: this module (inside a step) or, outside the steps, `forward_module()`.
        """
        tokenizer = self.tokenizer
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # an empty prompt starts after a document break
        s = self.sampling
        max_new = min(s.max_new_tokens, self.model.cfg.max_seq_len - len(ids))
        if max_new < 1:
            raise UserInputError(
                f"prompt of {len(ids)} tokens leaves no room within max_seq_len={self.model.cfg.max_seq_len}"
            )
        was_training = self.training
        self.eval()
        out = generate(
            model if model is not None else self,
            torch.tensor([ids], device=self.device),
            max_new,
            s.temperature,
            s.top_k,
            s.top_p,
            eos_id=tokenizer.eos_id,
            generator=generator,
        )
        self.train(was_training)
        return prompt + tokenizer.decode(t for t in out[0, len(ids) :].tolist() if t != tokenizer.eos_id)

    def predict_step(self, batch: list[str], batch_idx: int) -> list[str]:
        return [self.sample(prompt) for prompt in batch]
