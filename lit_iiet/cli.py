"""`python -m lit_iiet {fit,validate,test,predict} --config conf/....yaml`: LightningCLI with the project's defaults.

Every option is a typed, docstring'd `__init__` argument of a LightningModule, a LightningDataModule, the
Trainer or a callback; `--help` and `--print_config` show them all.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import set_docstring_parse_options
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_iiet.callbacks import TextPredictionWriter
from lit_iiet.checkpoint import SPECIAL_CKPT_PATHS, checkpoint_tokenizer, load_checkpoint
from lit_iiet.errors import UserInputError, exit_on_user_error


def runtime_options(class_path: str) -> tuple[str, ...]:
    """The model class's options that only change behaviour (`ODEModule.runtime_options`), dotted."""
    module, _, name = class_path.rpartition(".")
    return getattr(getattr(importlib.import_module(module), name, None), "runtime_options", ())


def command_line_keys(args: list[str]) -> set[str]:
    """The option names given on the command line (`--a.b v` or `--a.b=v`), without the dashes."""
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}


def checkpoint_dir(default_root_dir: str | None) -> str:
    """Checkpoints live in one stable folder per run directory, so that `--ckpt_path last` finds them."""
    return str(Path(default_root_dir or os.getcwd()) / "checkpoints")


class IIETCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always checkpoint: the best model by val/loss and last.ckpt. Lightning's version counter writes
        # last-v1.ckpt etc. rather than overwriting a checkpoint that a previous run left in the folder.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{step}",
            }
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.add_lightning_class_args(TextPredictionWriter, "prediction_writer")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # trainer.val_check_interval given as an int counts optimizer steps, like max_steps and the checkpoints'
        # every_n_train_steps, whatever accumulate_grad_batches; Lightning counts it in batches, so it gets
        # interval x accumulation. (Exact while each epoch holds whole accumulation windows: Lightning also steps
        # at an epoch's end.) Only the Trainer sees the product; the saved config.yaml keeps the value as given.
        trainer = self._get(self.config_init, "trainer", default={})
        interval, accumulate = trainer.get("val_check_interval"), trainer.get("accumulate_grad_batches") or 1
        if (
            isinstance(interval, int)
            and not isinstance(interval, bool)
            and isinstance(accumulate, int)
            and accumulate > 1
        ):
            kwargs.setdefault("val_check_interval", interval * accumulate)
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self.command_line = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here; check the file first so that a missing or
        # truncated checkpoint gets one line of explanation instead of a deep torch.load traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS:
            self._use_checkpoint_tokenizer(subcommand, ckpt_path, load_checkpoint(ckpt_path))
        elif ckpt_path == "last":
            self._use_checkpoint_tokenizer(subcommand, ckpt_path)
        given = self.config[subcommand]["model"].clone() if subcommand else None
        super()._parse_ckpt_path()
        if given is not None and ckpt_path:
            self._apply_checkpoint_rule(subcommand, ckpt_path, given)

    def _apply_checkpoint_rule(self, subcommand: str, ckpt_path: str, given) -> None:
        """Lightning merges the checkpoint's hyperparameters over the config, the command line's too. The rule
        (README, "Using it"): the model comes from the checkpoint, behaviour from the config given now. An option
        among the model's `runtime_options` keeps its given value; an option that defines the model and was given
        on the command line with another value than the checkpoint's is an error naming both."""
        merged = self.config[subcommand]["model"]
        explicit = command_line_keys(getattr(self, "command_line", []))
        given_args, merged_args = given.get("init_args"), merged.get("init_args")
        if given.get("class_path") != merged.get("class_path") or given_args is None or merged_args is None:
            return
        behaviour = runtime_options(merged["class_path"])
        for key, value in given_args.items():
            if key not in merged_args or merged_args[key] == value:
                continue
            # A policy switch to or from "router" changes the model: routers are parameters.
            router_switch = key.endswith(".iiet_policy") and "router" in (value, merged_args[key])
            if any(key == o or key.startswith(o + ".") for o in behaviour) and not router_switch:
                merged_args[key] = value
            elif any(
                f"model.{key}".startswith(k) or f"model.init_args.{key}".startswith(k)
                for k in explicit
                if k.startswith("model")
            ):
                raise UserInputError(
                    f"--model.{key} {value!r} contradicts checkpoint {ckpt_path!r}, whose model has {merged_args[key]!r}; "
                    "options that define the model come from the checkpoint (drop the option, or start a new run from "
                    "its weights with --model.init_from)"
                )

    def _use_checkpoint_tokenizer(self, subcommand: str, ckpt_path: str, checkpoint: dict | None = None) -> None:
        """Set data.tokenizer, before the data module is built, to the tokenizer the checkpoint carries (restored
        to a file under the cache dir); a given data.tokenizer must be that same model. `last` is found as
        Lightning finds it: the newest last*.ckpt of the run's checkpoint folder."""
        data = self.config[subcommand].get("data")
        init_args = data.get("init_args") if data is not None else None
        if init_args is None or "tokenizer" not in init_args:
            return  # a data module without a tokenizer option
        if checkpoint is None:
            folder = Path(checkpoint_dir(self.config[subcommand]["trainer"].get("default_root_dir")))
            found = list(folder.glob("last*.ckpt"))
            if not found:
                return  # Lightning warns and starts afresh
            ckpt_path = str(max(found, key=lambda p: p.stat().st_mtime))
            checkpoint = load_checkpoint(ckpt_path)
        tokenizer = checkpoint_tokenizer(
            checkpoint, ckpt_path, init_args["tokenizer"], "data.tokenizer", init_args.get("cache_dir")
        )
        if tokenizer is not None:
            init_args["tokenizer"] = str(tokenizer.path)


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m lit_iiet` and the `lit-iiet` script; tests call it with a list of arguments."""
    set_docstring_parse_options(attribute_docstrings=True)
    # LMDataModule's sampler resumes mid-epoch from Lightning's own counters; this warning does not apply.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ GPUs; no effect on CPU
    with exit_on_user_error():
        IIETCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf", "prog": "python -m lit_iiet"},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
