"""Average the weights of several checkpoints of one run (as fairseq's average_checkpoints.py does for WMT).

    python -m lit_iiet average runs/wmt14_en_de/checkpoints --last 5 --output avg.ckpt
    python -m lit_iiet average a.ckpt b.ckpt c.ckpt --output avg.ckpt

Keep more than the best and last checkpoint while training, e.g. --checkpoint.save_top_k -1
--checkpoint.every_n_train_steps 1000. The output carries the newest input's hyperparameters and step, the
run's tokenizer (inputs carrying different ones are refused), no optimizer state, and loads with `--ckpt_path`
for validate / test or with `load_from_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lit_iiet.checkpoint import TOKENIZER_KEY, load_checkpoint, stored_tokenizer
from lit_iiet.errors import UserInputError


def average(paths: list[Path]) -> dict:
    """The first checkpoint's structure with every floating-point tensor replaced by the mean over all paths."""
    checkpoints = [load_checkpoint(p, mmap=True) for p in paths]  # optimizer states stay on disk
    newest = max(checkpoints, key=lambda c: c.get("global_step", 0))
    keys = list(newest["state_dict"])
    for path, ckpt in zip(paths, checkpoints):
        if list(ckpt["state_dict"]) != keys or any(
            ckpt["state_dict"][k].shape != newest["state_dict"][k].shape for k in keys
        ):
            raise UserInputError(f"checkpoint {str(path)!r} has another architecture than the others; cannot average")
    state = {}
    for k in keys:
        tensors = [c["state_dict"][k] for c in checkpoints]
        state[k] = (
            torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)
            if tensors[0].is_floating_point()
            else tensors[0]
        )
    tokenizers = [
        (path, proto) for path, ckpt in zip(paths, checkpoints) if (proto := stored_tokenizer(ckpt, path)) is not None
    ]
    for path, proto in tokenizers[1:]:
        if proto != tokenizers[0][1]:
            raise UserInputError(
                f"checkpoints {str(tokenizers[0][0])!r} and {str(path)!r} carry different tokenizers; average one run's checkpoints"
            )
    out = {
        key: value
        for key, value in newest.items()
        if key not in ("optimizer_states", "lr_schedulers", "loops", "callbacks")
    }
    out["state_dict"] = state
    if tokenizers:  # the run's tokenizer, also when the newest checkpoint predates tokenizers in checkpoints
        out[TOKENIZER_KEY] = tokenizers[0][1]
    out["averaged_from"] = [str(p) for p in paths]
    return out


def select(inputs: list[str], last: int | None) -> list[Path]:
    """The checkpoints to average, ordered by step. A directory contributes one file per global step: `fit` leaves
    last.ckpt beside the step checkpoint it copies, and counting both would weigh the newest step twice."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            by_step: dict[int, Path] = {}
            for p in sorted(path.glob("*.ckpt"), key=lambda p: (p.name.startswith("last"), p.name)):
                by_step.setdefault(load_checkpoint(p, mmap=True).get("global_step", 0), p)  # a step file before last*
            paths += [by_step[step] for step in sorted(by_step)]
        else:
            paths.append(path)
    paths = list(dict.fromkeys(paths))
    if last is not None:
        paths = paths[-last:]
    if len(paths) < 2:
        raise UserInputError(f"need at least two checkpoints to average, found {len(paths)} in {inputs}")
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m lit_iiet average`; `python -m lit_iiet.average_checkpoints` is an alias."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_iiet average",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", help="checkpoint files, or a directory of them (one per global step, ordered by it)"
    )
    parser.add_argument("--last", type=int, default=None, help="average only the N checkpoints of highest step")
    parser.add_argument("--output", required=True, help="file to write; an existing file is never overwritten")
    args = parser.parse_args(argv)
    try:
        output = Path(args.output)
        if output.exists():
            raise UserInputError(f"output {str(output)!r} exists; choose another file name")
        paths = select(args.inputs, args.last)
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(average(paths), output)
    except UserInputError as e:
        print(f"lit_iiet: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"averaged {len(paths)} checkpoints -> {output}")
    for p in paths:
        print(f"  {p}")


if __name__ == "__main__":
    main()
