"""Fit runs of a folder as one study CSV (one row per run), read from what each run wrote.

    python -m benchmarks.collect_runs runs/mt_screen --out docs/results/mt_screen.csv \
        --scalars 'iiet/increment/enc*' 'grad/enc*'

Every subfolder holding `lightning_logs` is a run; its name is the arm. A run is left out until it has validated at
its trainer.max_steps. seed and lr come from the config that
LightningCLI saved with the run, val_loss / test_loss from the last logged `val/nll_loss` / `test/nll_loss` (the
token NLL of an encoder-decoder) or else `val/loss` / `test/loss`, the command from the run's `command.txt` when the
script that ran it wrote one. --scalars adds the last value of every matching TensorBoard scalar as a column.
`python -m benchmarks.results` then writes the table next to the CSV.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import sys
from pathlib import Path

import yaml

from lit_iiet.analysis.logs import read_scalars


def last(scalars: dict, *tags: str) -> str:
    for tag in tags:
        if scalars.get(tag):
            return f"{scalars[tag][-1][1]:.5f}"
    return ""


def collect(run: Path, patterns: list[str]) -> dict | None:
    """The run's row, or None while it has not validated at its trainer.max_steps (unfinished)."""
    configs = sorted(run.glob("lightning_logs/version_*/config.yaml"))
    if not configs:
        raise SystemExit(f"collect_runs: {run} has no lightning_logs/version_*/config.yaml")
    config = yaml.safe_load(configs[-1].read_text())
    scalars = read_scalars(run / "lightning_logs")
    max_steps = config["trainer"].get("max_steps") or -1
    if max_steps > 0 and (not scalars.get("val/loss") or scalars["val/loss"][-1][0] + 1 < max_steps):
        return None
    row = {
        "arm": run.name,
        "seed": config.get("seed_everything"),
        "lr": config["model"]["init_args"]["optim"]["lr"],
        "stage": "final",
        "val_loss": last(scalars, "val/nll_loss", "val/loss"),
        "test_loss": last(scalars, "test/nll_loss", "test/loss"),
        "step": scalars["val/loss"][-1][0] + 1 if scalars.get("val/loss") else "",
        "command": (run / "command.txt").read_text().strip() if (run / "command.txt").exists() else "",
    }
    tags = sorted({t for t in scalars for p in patterns if fnmatch.fnmatch(t, p)})
    row.update({tag: f"{scalars[tag][-1][1]:.5g}" for tag in tags})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder of runs (each a --trainer.default_root_dir)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--scalars", nargs="*", default=[], help="glob patterns of further scalars to record")
    parser.add_argument("--reference", help="the arm the others are compared with (default: the first by name)")
    args = parser.parse_args(argv)
    runs = sorted(p for p in args.folder.iterdir() if (p / "lightning_logs").is_dir())
    if not runs:
        print(f"collect_runs: no run folders (with lightning_logs) in {args.folder}", file=sys.stderr)
        return 1
    rows = [row for row in (collect(run, args.scalars) for run in runs) if row is not None]
    unfinished = sorted({run.name for run in runs} - {row["arm"] for row in rows})
    if unfinished:
        print(f"collect_runs: left out, not validated at their max_steps yet: {', '.join(unfinished)}")
    if not rows:
        print(f"collect_runs: no finished run in {args.folder}", file=sys.stderr)
        return 1
    if args.reference:
        if args.reference not in {r["arm"] for r in rows}:
            print(f"collect_runs: --reference {args.reference!r} is not a run in {args.folder}", file=sys.stderr)
            return 1
        rows = [{**r, "reference": args.reference} for r in rows]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"collect_runs: {len(rows)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
