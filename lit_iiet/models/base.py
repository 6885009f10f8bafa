"""What every lit_iiet LightningModule shares: plain-dict hyperparameters, init_from, checks, throughput logging."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Self

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.core.saving import _default_map_location
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from lit_iiet.checkpoint import TOKENIZER_KEY, checkpoint_tokenizer, load_checkpoint
from lit_iiet.data.tokenizer import Tokenizer
from lit_iiet.errors import UserInputError

# Parameters that start from their own init when init_from / an IIAD teacher lacks them: the routers of an adaptive
# policy, and a learned relaxation (it starts at iiet.damping, so plain-iteration weights keep their meaning).
OPTIONAL_PARAMS = ("model.update.routers.", "model.update.relaxation")


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Trainer precision setting ("bf16-mixed" -> bfloat16, "32-true" -> float32)."""
    precision = str(precision)
    return (
        torch.bfloat16
        if precision.startswith("bf16")
        else torch.float16
        if precision.startswith("16")
        else torch.float32
    )


def check_adam_options(cfg) -> None:
    """One-line errors for AdamW options that torch would reject with a traceback, or accept and misbehave on.
    Shared by the optimizer configs of both model families (`model.optim.*`)."""
    checks = [
        ("lr", cfg.lr, math.isfinite(cfg.lr) and cfg.lr > 0, "a number > 0"),
        ("eps", cfg.eps, math.isfinite(cfg.eps) and cfg.eps > 0, "a number > 0"),
        ("weight_decay", cfg.weight_decay, math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "a number >= 0"),
        ("warmup_steps", cfg.warmup_steps, cfg.warmup_steps >= 0, "an integer >= 0"),
        (
            "betas",
            list(cfg.betas),
            len(cfg.betas) == 2 and all(0.0 <= b < 1.0 for b in cfg.betas),
            "two numbers in [0, 1)",
        ),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise UserInputError(f"model.optim.{name}={value}: must be {allowed}")


def as_config(cls, value):
    """Dataclass from a dict: checkpoints store hyperparameters as plain dicts (weights_only loading)."""
    if not isinstance(value, dict):
        return value
    return cls(**value)


class ODEModule(L.LightningModule):
    """Base class. Subclasses set `self.model` and define `batch_tokens(batch)`, the number of tokens a batch
    trains on, and `forward_flops(batch)`, the matmul FLOPs of its forward pass with every F-evaluation counted
    (throughput logging uses both)."""

    # Options (dotted, under the model's init_args) that set how a trained model runs, not what it is: with
    # --ckpt_path the CLI takes them from the config and command line given now, and the rest from the checkpoint.
    runtime_options: tuple[str, ...] = ()
    # Hyperparameters that every checkpoint of the class holds: how `from_checkpoint` tells the model families
    # apart in a checkpoint that LightningCLI did not write (a Llama import), which records no class.
    checkpoint_keys: tuple[str, ...] = ()
    _own_tokenizer: Tokenizer | None = None  # the checkpoint's, restored by from_checkpoint
    init_from: str | None = None
    flops_per_batch: int | None = None  # of the current training batch; Lightning's ThroughputMonitor reads it too
    _peak_flops: int | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        map_location: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        **runtime_options: Any,
    ) -> Self:
        """A trained model in eval mode on map_location, with the tokenizer its checkpoint carries (`tokenizer`),
        ready for `sample` (LanguageModel) or `generate_text` (Seq2SeqModel) without a Trainer.

        Args:
            path: A checkpoint of `fit` (or of `python -m lit_iiet average`, or a Llama import).
            map_location: Device of the model.
            cache_dir: Where the checkpoint's tokenizer is restored; default $LIT_IIET_CACHE or ~/.cache/lit_iiet.
            **runtime_options: Settings among the class's `runtime_options` that replace the checkpoint's, by their
                dotted names: `sampling={"temperature": 0}` (a dict updates the stored settings, a config object
                replaces them) or `**{"ode.iiet.policy": "residual"}`. Options that define the model are not
                accepted: they must match the weights.
        """
        return cls.from_loaded_checkpoint(load_checkpoint(path), path, map_location, cache_dir, **runtime_options)

    @classmethod
    def from_loaded_checkpoint(
        cls,
        checkpoint: dict,
        source: str | Path,
        map_location: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        **runtime_options: Any,
    ) -> Self:
        """`from_checkpoint` for a checkpoint already read with `load_checkpoint`, so that a caller that also needs
        the rest of the file reads it once; `source` names it in errors."""
        hparams = cls.checkpoint_hparams(checkpoint, source)
        hparams.pop("init_from", None)  # the weights are the checkpoint's; fit must not replace them
        for name, value in runtime_options.items():
            cls.set_runtime_option(hparams, name, value, source)
        model = cls.with_weights(checkpoint, source, hparams)
        model._own_tokenizer = checkpoint_tokenizer(checkpoint, source, cache_dir=cache_dir)
        return model.to(map_location).eval()

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path,
        map_location=None,
        hparams_file=None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs,
    ) -> Self:
        """Lightning's method on the loader of `from_checkpoint`. As in Lightning, `kwargs` replace any stored
        hyperparameter (the model's too), the module comes back in training mode, and the weights stay on the
        device they were saved from unless map_location says otherwise. Lightning's own loader reads what ours
        does not: file objects, hparams_file, weights_only=False."""
        if hparams_file is not None or weights_only is False or not isinstance(checkpoint_path, (str, Path)):
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only=weights_only, **kwargs
            )
        checkpoint = load_checkpoint(checkpoint_path, map_location=map_location or _default_map_location)
        hparams = {**cls.checkpoint_hparams(checkpoint, checkpoint_path), **kwargs}
        model = cls.with_weights(checkpoint, checkpoint_path, hparams, strict)
        model.configure_model()
        state = checkpoint["state_dict"]
        return model.to(next((t.device for t in state.values() if isinstance(t, Tensor)), torch.device("cpu")))

    @classmethod
    def checkpoint_hparams(cls, checkpoint: dict, source: str | Path) -> dict:
        """A loaded checkpoint's hyperparameters, once it is known to be one
        of this class: by the class LightningCLI recorded, else by the `checkpoint_keys` it carries."""
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        theirs = str(class_path).rpartition(".")[2] if class_path is not None else None
        missing = [key for key in cls.checkpoint_keys if key not in hparams]
        if theirs is not None and theirs != cls.__name__:
            raise UserInputError(f"checkpoint {str(source)!r} is a {theirs} checkpoint, not a {cls.__name__} one")
        if theirs is None and (missing or not cls.checkpoint_keys):
            what = " / ".join(missing) or "model"
            raise UserInputError(
                f"checkpoint {str(source)!r} is not a {cls.__name__} checkpoint (no {what} hyperparameters)"
            )
        return hparams

    @classmethod
    def with_weights(cls, checkpoint: dict, source: str | Path, hparams: dict, strict: bool | None = None) -> Self:
        """The module that `hparams` build (those __init__ takes), holding the checkpoint's weights."""
        accepted = inspect.signature(cls.__init__).parameters
        model = cls(**{k: v for k, v in hparams.items() if k in accepted and k != "self"})
        model.check_state_dict(checkpoint["state_dict"], str(source))
        model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading if strict is None else strict)
        return model

    @classmethod
    def is_runtime_change(cls, key: str, old: Any, new: Any) -> bool:
        """Whether setting option `key` (dotted, under the model's init_args) from old to new changes only how the
        model runs: it is, or lies under, one of `runtime_options`, and is no switch of the IIET policy to or from
        "router" (routers are parameters)."""
        router_switch = key.endswith("iiet.policy") and "router" in (old, new)
        return not router_switch and any(key == o or key.startswith(o + ".") for o in cls.runtime_options)

    @classmethod
    def set_runtime_option(cls, hparams: dict, name: str, value: Any, source: str | Path) -> None:
        """Put one of `runtime_options` (dotted name) into a checkpoint's hyperparameters. A dict updates the
        stored settings; a config dataclass replaces them."""
        if name not in cls.runtime_options:
            allowed = ", ".join(cls.runtime_options)
            raise UserInputError(
                f"{name}={value!r} is not a runtime option of {cls.__name__}; allowed: {allowed} "
                "(the others define the model and come from the checkpoint)"
            )
        *parents, leaf = name.split(".")
        node = hparams
        for key in parents:
            node = node.setdefault(key, {})
        old = node.get(leaf)
        if is_dataclass(value):
            value = asdict(value)
        elif isinstance(value, dict) and isinstance(old, dict):
            unknown = sorted(set(value) - set(old))
            if unknown:
                raise UserInputError(f"{name}: unknown setting {unknown[0]!r}; choose from {', '.join(old)}")
            value = {**old, **value}
        if not cls.is_runtime_change(name, old, value):
            raise UserInputError(
                f"{name}={value!r} changes the model, not only how it runs; checkpoint {str(source)!r} has {old!r}"
            )
        node[leaf] = value

    def save_configs(self, **configs) -> None:
        """save_hyperparameters, with each config dataclass stored as a plain dict.

        LightningCLI records the class path here, so that `--ckpt_path` rebuilds this exact model; plain dicts
        keep checkpoints loadable with torch.load(weights_only=True).
        """
        self.save_hyperparameters()
        for name, config in configs.items():
            self.hparams[name] = self._hparams_initial[name] = asdict(config)

    @property
    def datamodule(self):
        return self.trainer.datamodule if self._trainer is not None else None

    @property
    def tokenizer(self) -> Tokenizer:
        """The data module's tokenizer in a Trainer; outside one, the checkpoint's that `from_checkpoint` restored."""
        tokenizer = getattr(self.datamodule, "tokenizer", None) or self._own_tokenizer
        if tokenizer is None:
            name = type(self).__name__
            raise UserInputError(
                f"this {name} has no tokenizer: load it with {name}.from_checkpoint(path) from a checkpoint that carries "
                "one, or run it in a Trainer with its data module"
            )
        return tokenizer

    def check_vocab(self, tokenizer: Tokenizer | None, vocab_size: int, key: str = "model.arch.vocab_size") -> None:
        """One-line error when the data's tokenizer has ids that the embedding (vocab_size rows) lacks."""
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            raise UserInputError(
                f"{key}={vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size}); "
                f"set {key} >= {tokenizer.vocab_size}"
            )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from:
            checkpoint = load_checkpoint(self.init_from)
            self.load_weights(checkpoint["state_dict"], self.init_from)  # another shape is the clearer error
            self.check_embed_scale(checkpoint.get("hyper_parameters", {}).get("arch"), self.init_from)

    def check_embed_scale(self, arch: dict | None, source: str) -> None:
        """The embedding scale is no weight: weights trained under another one would silently compute another
        function. Checkpoints from before the option existed were trained with 1."""
        own = getattr(self.model.cfg, "embed_scale", None)
        if own is None or arch is None:
            return
        theirs = float(arch.get("embed_scale", 1.0))
        if abs(theirs - own) > 1e-6 * max(1.0, own):
            raise UserInputError(
                f"checkpoint {source!r} was trained with embed_scale={theirs:g}, this model has embed_scale={own:g}; "
                f"set --model.arch.embed_scale {theirs:g} to continue from it"
            )

    def load_weights(self, state: dict[str, Tensor], source: str) -> None:
        """Initialise from another model's weights; the OPTIONAL_PARAMS it lacks keep their init."""
        self.check_state_dict(state, source, allow_missing=OPTIONAL_PARAMS)
        self.load_state_dict(state, strict=False)

    def check_state_dict(self, state: dict[str, Tensor], source: str, allow_missing: tuple[str, ...] = ()) -> None:
        """A short error instead of load_state_dict's wall of missing / unexpected keys."""
        own = {k: v.shape for k, v in self.state_dict().items()}
        missing = sorted(k for k in set(own) - set(state) if not k.startswith(allow_missing))
        extra = sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and state[k].shape != own[k]]
        if missing or extra or wrong:
            what = (
                f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, the model has {tuple(own[wrong[0]])}"
                if wrong
                else f"missing {missing[:3]}"
                if missing
                else f"unexpected {extra[:3]}"
            )
            raise UserInputError(f"checkpoint {source!r} does not fit this model's architecture: {what}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_state_dict(checkpoint["state_dict"], "given")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The tokenizer travels with the weights, so a copied checkpoint scores, predicts and resumes with the
        # ids it was trained on (`checkpoint_tokenizer` reads it back). The data module owns it.
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        if tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = tokenizer.model_proto

    def forward_module(self) -> torch.nn.Module:
        """What a forward pass outside the training / validation step calls (generation, influence analysis):
        FSDP's wrapper where the strategy shards the parameters, so that its hooks gather them (on every rank:
        call it on all of them), else this module itself."""
        wrapper = self._trainer.strategy.model if self._trainer is not None else None
        return wrapper if isinstance(wrapper, FullyShardedDataParallel) else self

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses norm clipping under FSDP (each rank holds a shard of every gradient); FSDP's own
        # clip_grad_norm_ reduces the norm over all ranks.
        wrapper = self.trainer.strategy.model
        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and isinstance(wrapper, FullyShardedDataParallel)
        ):
            wrapper.clip_grad_norm_(gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on weight matrices only; not on norms, biases, or scheme coefficients (`*.update.*`)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 and "update." not in name else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Training costs 3x the forward matmuls (the backward pass computes two per forward matmul).
        self.flops_per_batch = 3 * self.forward_flops(batch)
        if self._peak_flops is None and self.device.type == "cuda":
            self._peak_flops = get_available_flops(self.device, precision_dtype(self.trainer.precision))
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Wall time of this micro-batch's forward + backward (+ optimizer step when it falls here).
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - self._step_start
        self.log("perf/step_time", step_time)
        self.log("perf/tokens_per_sec", self.batch_tokens(batch) * self.trainer.world_size / step_time, prog_bar=True)
        self.log("perf/flops_per_sec", self.flops_per_batch / step_time)  # per device
        if self._peak_flops:  # MFU only where the device's peak is known (Lightning's table of GPUs)
            self.log("perf/mfu", self.flops_per_batch / step_time / self._peak_flops)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
