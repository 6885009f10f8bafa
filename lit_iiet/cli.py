"""`lit-iiet COMMAND ...` (or `python -m lit_iiet COMMAND ...`): the project's one command.

fit, validate, test and predict are LightningCLI with the project's defaults: every option is a typed,
docstring'd `__init__` argument of a LightningModule, a LightningDataModule, the Trainer or a callback;
`--help` and `--print_config` show them all. prepare, average, convert and evaluate hand the rest of the
command line to their module's own parser (`TOOLS`).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import torch
from jsonargparse import set_docstring_parse_options
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_iiet.callbacks import TextPredictionWriter
from lit_iiet.checkpoint import SPECIAL_CKPT_PATHS, checkpoint_tokenizer, load_checkpoint
from lit_iiet.errors import UserInputError, exit_on_user_error, user_error_in

PROG = "python -m lit_iiet"
# omegaconf+ resolves ${...} interpolations over the whole merged config (every file, then the command line), so
# a value a config derives from another (data.vocab_size from model.arch.vocab_size) follows an override of it.
PARSER_MODE = "omegaconf+"
TRAINER_COMMANDS = {
    "fit": "train a model, or resume a run with --ckpt_path",
    "validate": "score a checkpoint on the validation split",
    "test": "score a checkpoint on the test split (BLEU / ROUGE for translation and summaries)",
    "predict": "continue prompts, or translate / summarize a file, with a checkpoint",
}
# Commands with their own parser: command -> (module whose main(argv) runs it, summary).
TOOLS = {
    "prepare": ("lit_iiet.data.prepare", "tokenize a local corpus once into token shards"),
    "average": ("lit_iiet.average_checkpoints", "average the weights of several checkpoints of one run"),
    "convert": ("lit_iiet.hf_llama", "Hugging Face Llama checkpoints to lit_iiet and back (import | export)"),
    "evaluate": ("lit_iiet.eval_harness", "score a language-model checkpoint on lm-evaluation-harness tasks"),
}


def usage() -> str:
    """The top-level help: every command with one line."""
    rows = {**TRAINER_COMMANDS, **{name: summary for name, (_, summary) in TOOLS.items()}}
    commands = "\n".join(f"  {name:<10}{summary}" for name, summary in rows.items())
    return (
        f"usage: {PROG} COMMAND [options]   (installed: lit-iiet COMMAND [options])\n\n"
        "ODE-inspired Transformers (IIET, RK2/RK4, PCformer) in PyTorch Lightning.\n\n"
        f"commands:\n{commands}\n\n"
        "fit, validate, test and predict take --config, --model.*, --data.*, --trainer.* and --ckpt_path.\n"
        f"`{PROG} COMMAND --help` lists a command's options."
    )


def model_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def command_line_keys(args: list[str]) -> set[str]:
    """The option names given on the command line (`--a.b v` or `--a.b=v`), without the dashes."""
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}


def checkpoint_dir(default_root_dir: str | None) -> str:
    """Checkpoints live in one stable folder per run directory, so that `--ckpt_path last` finds them."""
    return str(Path(default_root_dir or os.getcwd()) / "checkpoints")


def config_files(args: list[str]) -> list[str]:
    """The files of `--config F` / `--config=F` in a command line, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


def run_folder(config_files: list) -> str:
    """A run's folder when no config sets trainer.default_root_dir: runs/ and the names of its config files, base
    first, trainer presets left out (`--config conf/lm/shakespeare.yaml --config conf/scheme/euler.yaml`:
    runs/shakespeare_euler), so that every combination of overlays has its own folder."""
    names = [Path(str(path)).stem for path in config_files if Path(str(path)).parent.name != "trainer"]
    return str(Path("runs") / "_".join(names))


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
        config = self.config[self.config["subcommand"]] if "subcommand" in self.config else self.config
        files = config_files(self.command_line)
        if config["trainer"].get("default_root_dir") is None and files:
            config["trainer"]["default_root_dir"] = run_folder(files)
            config["checkpoint"]["dirpath"] = checkpoint_dir(config["trainer"]["default_root_dir"])

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here; check the file first so that a missing or
        # truncated checkpoint gets one line of explanation instead of a deep torch.load traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        checkpoint = None
        if ckpt_path not in SPECIAL_CKPT_PATHS:
            checkpoint = load_checkpoint(ckpt_path)
            self._use_checkpoint_tokenizer(subcommand, ckpt_path, checkpoint)
        elif ckpt_path == "last":
            self._use_checkpoint_tokenizer(subcommand, ckpt_path)
        if checkpoint is None:
            return  # "last" etc.: Lightning resolves them in the Trainer, with the hyperparameters of the config
        given = self.config[subcommand]["model"].clone()
        # What LightningCLI does with the checkpoint's hyperparameters, then the rule below.
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        self._apply_checkpoint_rule(subcommand, ckpt_path, given)

    def _apply_checkpoint_rule(self, subcommand: str, ckpt_path: str, given) -> None:
        """Lightning merges the checkpoint's hyperparameters over the config, the command line's too. The rule
        (docs/USAGE.md, "The command line"): the model comes from the checkpoint, behaviour from the config given
        now. An option among the model's `runtime_options` keeps its given value; an option that defines the model
        and was given on the command line with another value than the checkpoint's is an error naming both."""
        merged = self.config[subcommand]["model"]
        explicit = command_line_keys(getattr(self, "command_line", []))
        given_args, merged_args = given.get("init_args"), merged.get("init_args")
        if given.get("class_path") != merged.get("class_path") or given_args is None or merged_args is None:
            return
        cls = model_class(merged["class_path"])
        is_runtime_change = getattr(cls, "is_runtime_change", lambda key, old, new: False)  # see ODEModule
        for key, value in given_args.items():
            if key not in merged_args or merged_args[key] == value:
                continue
            if is_runtime_change(key, merged_args[key], value):
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


def short_parse_error(message: str, subcommand: str) -> str:
    """jsonargparse's report of a bad option on one line, with the command that lists the options it is about.

    A model's or data module's own options are checked by that class's parser, whose report comes nested under
    `- Problem with given class_path 'C':` in the report of the `model` / `data` key; only that inner report names
    the option, so it is the part kept (its lines joined), and `--model.help C` lists the options.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("- Problem with given class_path"):
            group, class_path = lines[0].split('"')[1], line.split("'")[1]
            see = f"(see {PROG} {subcommand} --{group}.help {class_path})"
            detail = lines[i + 1 :]
            if detail and detail[0].startswith('Parser key "') and "Given value: None" in detail:
                # jsonargparse (4.53) hands a null given to a nested option of a subclass on as the string "None";
                # the mapping form of the option above it parses, and merges into it
                parent, _, leaf = detail[0].split('"')[1].rpartition(".")
                if parent and "Given value type: <class 'str'>" in detail:
                    return (
                        f"{group}: --{group}.{parent}.{leaf} null arrives as the string 'None'; "
                        f"write --{group}.{parent} '{{{leaf}: null}}' {see}"
                    )
            detail = detail[: next((k for k, text in enumerate(detail) if text.startswith("- ")), len(detail))]
            return f"{group}: {' '.join(detail)} {see}"
    return f"{' '.join(lines)} (see {PROG} {subcommand} --help)"


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m lit_iiet` and the `lit-iiet` script; tests call it with a list of arguments."""
    given = list(sys.argv[1:] if args is None else args)
    command = given[0] if given else None
    if command in TOOLS:
        importlib.import_module(TOOLS[command][0]).main(given[1:])
        return
    if command in ("-h", "--help"):
        print(usage())
        return
    if command is None or (command not in TRAINER_COMMANDS and not command.startswith("-")):
        with exit_on_user_error():
            choices = ", ".join([*TRAINER_COMMANDS, *TOOLS])
            what = "no command given" if command is None else f"unknown command {command!r}"
            raise UserInputError(f"{what}; choose one of {choices} (see {PROG} --help)")
    lightning_cli(args)


def build_cli(args: list[str] | None, run: bool = True) -> IIETCLI:
    """The LightningCLI of fit / validate / test / predict. run=False: no subcommand; parse the configs and
    instantiate the model, the data module and the Trainer (`cli.model`, `cli.datamodule`, `cli.trainer`)."""
    return IIETCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # Bad options raise instead of printing the whole usage: they end in one line, as other bad input.
        parser_kwargs={"parser_mode": PARSER_MODE, "prog": PROG, "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def lightning_cli(args: list[str] | None) -> IIETCLI:
    """fit, validate, test and predict; returns the LightningCLI (its `trainer`, `model` and `datamodule`)."""
    set_docstring_parse_options(attribute_docstrings=True)
    # LMDataModule's sampler resumes mid-epoch from Lightning's own counters; this warning does not apply.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ GPUs; no effect on CPU
    with exit_on_user_error():
        try:
            return build_cli(args)
        except ArgumentError as e:
            if user_error_in(e) is not None:
                raise
            given = list(sys.argv[1:] if args is None else args)
            subcommand = next((a for a in given if not a.startswith("-")), "SUBCOMMAND")
            raise UserInputError(short_parse_error(str(e), subcommand)) from None
