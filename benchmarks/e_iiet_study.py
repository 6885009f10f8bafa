"""E-IIET (IIAD) against its controls, from trained vanilla and IIET checkpoints, in one resumable run.

    python -m benchmarks.e_iiet_study --vanilla V.ckpt --teacher IIET.ckpt --out runs/e_iiet

Every row continues training for the steps of conf/recipe/iiad.yaml (its lr, schedule, data and seed;
--seed changes the seed), so all rows end at the same total number of steps:
- vanilla: the vanilla checkpoint, cross-entropy only;
- IIET: the teacher, cross-entropy only;
- E-IIET, IIAD t: the IIAD callback at each threshold t of --thresholds (prune by influence, then distil);
- pruned at t, CE only: the teacher's weights with the schedule that IIAD chose at the first threshold, trained
  without the teacher (what distillation adds is the gap to the row above).
Then val/loss and test/loss, and cached greedy decoding tokens/s as a ratio to vanilla (benchmarks.decode_speed:
batch 1, 16-token prompt + 96 tokens, rounds alternated, median). A row whose result.json exists is skipped.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from benchmarks.common import fit_and_test, machine
from benchmarks.decode_speed import decode_speeds
from lit_iiet.models import LanguageModel

RECIPE = ["--config", "conf/lm/shakespeare.yaml", "--config", "conf/recipe/iiad.yaml"]


def rows(vanilla: str, teacher: str, thresholds: list[float], out: Path) -> dict[str, list[str]]:
    """Row label -> the fit arguments that make it (the CE-only pruned row needs the IIAD run's schedule)."""
    ce = ["--trainer.callbacks=[]"]
    table = {
        "vanilla": [
            *RECIPE,
            *ce,
            "--model.ode.scheme",
            "euler",
            "--model.ode.iters",
            "1",
            "--model.init_from",
            vanilla,
        ],
        "IIET": [*RECIPE, *ce, "--model.init_from", teacher],
    }
    for t in thresholds:
        table[f"E-IIET, IIAD t={t:g}"] = [
            *RECIPE,
            "--trainer.callbacks.teacher",
            teacher,
            "--trainer.callbacks.threshold",
            str(t),
        ]
    first = out / f"E-IIET_IIAD_t={thresholds[0]:g}" / "result.json"
    if first.exists():
        schedule = json.loads(first.read_text())["schedule"]
        table[f"pruned at t={thresholds[0]:g}, CE only"] = [
            *RECIPE,
            *ce,
            "--model.ode.iters",
            json.dumps(schedule),
            "--model.init_from",
            teacher,
        ]
    return table


def run(label: str, args: list[str], out: Path, seed: int | None, extra: list[str]) -> dict:
    run_dir = out / label.replace(", ", "_").replace(" ", "_")
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    args = [*args, *extra] + (["--seed_everything", str(seed)] if seed is not None else [])
    result = fit_and_test(args, run_dir)
    module = LanguageModel.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    result |= {
        "label": label,
        "command": "python -m lit_iiet fit " + " ".join(args),
        "schedule": module.model.schedule,
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
    }
    done.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vanilla", required=True, help="trained euler checkpoint")
    parser.add_argument("--teacher", required=True, help="trained IIET checkpoint (the teacher)")
    parser.add_argument("--out", default="runs/e_iiet")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.3, 1.0])
    parser.add_argument("--seed", type=int, default=None, help="seed of every row (default: the recipe's)")
    parser.add_argument("--rounds", type=int, default=5, help="decode-speed rounds")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="--KEY=VALUE",
        help="a fit option added to every row, e.g. --override=--trainer.max_steps=300 (repeatable)",
    )
    args = parser.parse_args(argv)
    for path in (args.vanilla, args.teacher):
        if not Path(path).is_file():
            parser.error(f"checkpoint {path!r} does not exist")
    out = Path(args.out)
    results = {}
    for _ in range(2):  # the second pass adds the CE-only pruned row, once IIAD has chosen its schedule
        for label, fit_args in rows(args.vanilla, args.teacher, args.thresholds, out).items():
            results[label] = run(label, fit_args, out, args.seed, args.override)

    models = {label: LanguageModel.from_checkpoint(r["checkpoint"]).model for label, r in results.items()}
    speed = decode_speeds(models, batch=1, prompt_len=16, tokens=96, rounds=args.rounds, device="cpu")
    full = sum(results["IIET"]["schedule"])
    lines = [
        f"E-IIET study, {date.today()}, {machine(torch.device('cpu'))}; every row trains the "
        f"steps of {RECIPE[1]} from its checkpoint. Decoding: batch 1, 16 + 96 tokens, median of {args.rounds} rounds.",
        "",
        "| model | schedule | layer evaluations vs IIET | val/loss | test/loss | decode tokens/s vs vanilla |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['schedule']} | {sum(r['schedule']) / full:.2f} | {r['val_loss']:.3f} | "
            f"{r['test_loss']:.3f} | {speed[label]:.2f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
