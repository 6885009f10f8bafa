"""`python -m lit_iiet {fit,validate,test,predict} --config conf/....yaml`: LightningCLI with the project's defaults.

Every option is a typed, docstring'd `__init__` argument of a LightningModule, a LightningDataModule, the
Trainer or a callback; `--help` and `--print_config` show them all.
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from pathlib import Path

import torch
from jsonargparse import set_docstring_parse_options
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_iiet.callbacks import TextPredictionWriter
from lit_iiet.checkpoint import SPECIAL_CKPT_PATHS, checkpoint_tokenizer, load_checkpoint
from lit_iiet.errors import exit_on_user_error


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
        if isinstance(interval, int) and not isinstance(interval, bool) and isinstance(accumulate, int) and accumulate > 1:
            kwargs.setdefault("val_check_interval", interval * accumulate)
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here; check the file first so that a missing or
        # truncated checkpoint gets one line of explanation instead of a deep torch.load traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS:
            self._use_checkpoint_tokenizer(subcommand, ckpt_path, load_checkpoint(ckpt_path))
        elif ckpt_path == "last":
            self._use_checkpoint_tokenizer(subcommand, ckpt_path)
        # Lightning's merge puts every hyperparameter of the checkpoint over the config, the command line's too;
        # the model's runtime options (how it decodes and is scored, e.g. --model.decoding.beam 8) stay as given.
        given = self._runtime_settings(subcommand) if ckpt_path else {}
        super()._parse_ckpt_path()
        for key, value in given.items():  # the merge writes the checkpoint's values into model.init_args
            self.config[subcommand]["model"]["init_args"][key] = value

    def _runtime_settings(self, subcommand: str) -> dict:
        """The config's values of the model's `runtime_options` (see Seq2SeqModel)."""
        model = self.config[subcommand].get("model")
        if model is None or not model.get("class_path") or model.get("init_args") is None:
            return {}
        module, _, name = model["class_path"].rpartition(".")
        options = getattr(getattr(importlib.import_module(module), name, None), "runtime_options", ())
        return {key: copy.deepcopy(model["init_args"][key]) for key in options if key in model["init_args"]}

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
        tokenizer = checkpoint_tokenizer(checkpoint, ckpt_path, init_args["tokenizer"], "data.tokenizer", init_args.get("cache_dir"))
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
