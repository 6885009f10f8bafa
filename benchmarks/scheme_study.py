"""Schemes and IIET options on the shipped corpora, tuned alike and repeated over seeds.

    python -m benchmarks.scheme_study --out runs/lm_core --name lm_core --results docs/results --arms euler iiet \
        --tune_seeds 1 2 --seeds 101 102 103 104 105 106 107 108 109 110 111 112   # docs/results/lm_core.*
    python -m benchmarks.scheme_study --out runs/screen --arms iiet "iiet anderson" --lrs 2e-3 --seeds 1337
    python -m benchmarks.scheme_study --out runs/mt --arms "mt euler" "mt iiet" --lrs 1e-3 2e-3 4e-3   # translation

Every arm is a shipped config (`conf/lm/shakespeare.yaml` with a `conf/scheme/<scheme>.yaml` overlay, or
`conf/mt/bible_fr_en.yaml` with a `conf/encoder/<scheme>.yaml` overlay for the "mt" arms) plus a few command-line overrides, so any row can be rerun by hand with the command that the CSV
records. The arms of one study share a task. For translation, val_loss and test_loss are the token NLL without
label smoothing, the validation decodes nothing, and the test adds BLEU and chrF (whole test split). For each arm:
1. tuning: one run per learning rate of --lrs with each of --tune_seeds; the lr with the lowest mean final
   val/loss is the arm's lr (validation chooses);
2. final: the chosen lr with every seed of --seeds (disjoint from --tune_seeds: a tuning run is not reused as a
   final run); the table reports the mean and standard deviation over those seeds of val/loss and of test/loss
   (the test split is only read here, never for choosing), and the difference to euler paired by seed.
Every arm gets the same lr grid and the same seeds. An arm's final runs start as soon as its own tuning has
finished, seed by seed across arms and before the tuning of arms listed later, so list the comparison that matters
first. Runs are independent processes and resumable: a run recorded in the study's CSV or with its result.json
written is skipped (and recorded in the CSV if it is not yet), an interrupted one resumes from its
last checkpoint, and a run whose command changed since (an edited arm or config) is refused rather than mixed
in. The CSV (--results/NAME.csv, one row per run, written as runs finish) is the study's record: commit it, and
`python -m benchmarks.results` regenerates NAME.md from it alone. --out holds the runs, NAME_detail.md
(contraction per layer, what each arm is) and NAME.png.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import yaml

from benchmarks.common import fit_and_test

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    """One row of the study: a shipped config and the overrides that make this variant."""

    configs: tuple[str, ...]
    """The config files, base first (`--config` each)."""
    overrides: tuple[str, ...] = ()
    what: str = ""
    flops: float | None = 1.0
    """Training FLOPs relative to the euler arm (F-evaluations x steps), for the table (None: not worked out)."""
    group: str = "scheme"
    """scheme (equal parameters and steps), option (an IIET option), flops (vanilla at IIET r = 3's FLOPs) or
    stream (without the stream scale)."""
    task: str = "lm"
    """lm (decoder-only, Shakespeare) or mt (encoder-decoder, Bible Fr->En)."""
    references: tuple[str, ...] = ()
    """The arms this one is paired with in the table (the CSV's `reference` column); none: the study's first arm."""


def lm(scheme: str) -> tuple[str, ...]:
    """conf/lm/shakespeare.yaml (IIET r = 3) with the scheme's overlay conf/scheme/<scheme>.yaml."""
    return ("conf/lm/shakespeare.yaml",) + (() if scheme == "iiet" else (f"conf/scheme/{scheme}.yaml",))


def mt(
    encoder: str,
    overrides: tuple[str, ...] = (),
    what: str = "",
    group: str = "scheme",
    references: tuple[str, ...] = (),
    branch_scale: float | None = None,
) -> Arm:
    """An arm of the translation study: conf/mt/bible_fr_en.yaml (IIET encoder) with the encoder's overlay. The
    encoder's branch scale is always given, so an arm (and its recorded runs) stays what it was when the shipped
    config's default changes."""
    configs = ("conf/mt/bible_fr_en.yaml",) + (() if encoder == "iiet" else (f"conf/encoder/{encoder}.yaml",))
    # `--model.enc_ode.branch_scale null` reaches the model as the string "None" (jsonargparse 4.53 stringifies a
    # nested null in a subclass's arguments); the mapping form parses, and merges into enc_ode.
    scale = ("--model.enc_ode", f"{{branch_scale: {'null' if branch_scale is None else f'{branch_scale:g}'}}}")
    return Arm(configs, scale + overrides, what, None, group, "mt", references)


CONTROL_REFERENCES = ("euler", "iiet")
ARMS: dict[str, Arm] = {
    "euler": Arm(lm("euler"), what="vanilla Transformer++"),
    "iiet": Arm(lm("iiet"), what="IIET r = 3, plain Picard iteration", flops=3),
    "iiet r=2": Arm(lm("iiet_r2"), what="IIET r = 2", flops=2),
    "iiet anderson": Arm(
        lm("iiet"), ("--model.ode.iiet.solver", "anderson"), "IIET r = 3, Anderson acceleration", 3, "option"
    ),
    "iiet relaxation": Arm(
        lm("iiet"), ("--model.ode.iiet.relaxation", "learned"), "IIET r = 3, learned relaxation per layer", 3, "option"
    ),
    "iiet mean": Arm(lm("iiet"), ("--model.ode.iiet.output", "mean"), "IIET r = 3, output y + mean slope", 3, "option"),
    "iiet damping 0.5": Arm(lm("iiet"), ("--model.ode.iiet.damping", "0.5"), "IIET r = 3, damping 0.5", 3, "option"),
    "iiet sublayer": Arm(
        lm("iiet"), ("--model.ode.iiet.unit", "sublayer"), "IIET r = 3, attention then FFN solved in turn", 3, "option"
    ),
    "iiet branch_norm": Arm(lm("iiet"), ("--model.ode.branch_norm", "true"), "IIET r = 3, RMSNorm on G", 3, "option"),
    # The controls of the language-model study are paired with vanilla and with IIET r = 3 (same seeds).
    "looped": Arm(
        lm("looped"),
        what="looped r = 3: weight-tied explicit steps, IIET's FLOPs without its anchor",
        flops=3,
        references=CONTROL_REFERENCES,
    ),
    "rk2": Arm(lm("rk2"), what="ODE Transformer RK2", flops=2, references=CONTROL_REFERENCES),
    "rk2_gated": Arm(lm("rk2_gated"), what="ODE Transformer RK2, gated", flops=2),
    "rk4": Arm(lm("rk4"), what="ODE Transformer RK4", flops=4, references=CONTROL_REFERENCES),
    "pcformer": Arm(lm("pcformer"), what="PCformer", flops=3, references=CONTROL_REFERENCES),
    "euler 3x steps": Arm(
        lm("euler"),
        ("--trainer.max_steps", "1800"),
        "vanilla, 1800 steps",
        3,
        "flops",
        references=CONTROL_REFERENCES,
    ),
    "euler 12 layers": Arm(
        lm("euler"), ("--model.arch.n_layers", "12"), "vanilla, 12 layers (3x parameters)", 3, "flops"
    ),
}
# Translation (issue: why the IIET encoder trains worse). The decoder is vanilla unless an arm says otherwise.
MT_ARMS: dict[str, Arm] = {
    "mt euler": mt("euler", what="vanilla encoder"),
    "mt iiet": mt("iiet", what="IIET r = 3 encoder"),
    "mt looped": mt("iiet", ("--model.enc_ode.scheme", "looped"), "looped r = 3 encoder (weight-tied explicit steps)"),
    "mt iiet r=2": mt("iiet", ("--model.enc_ode.iters", "2"), "IIET r = 2 encoder"),
    "mt iiet relaxation": mt(
        "iiet", ("--model.enc_ode.iiet.relaxation", "learned"), "IIET r = 3, learned relaxation", "option"
    ),
    "mt iiet decoder": mt(
        "iiet",
        ("--model.dec_ode.scheme", "iiet", "--model.dec_ode.iters", "3"),
        "IIET r = 3 in the encoder and the decoder",
    ),
    "mt iiet shared dropout": mt(
        "iiet", ("--model.enc_ode.dropout_mask", "layer"), "IIET r = 3, one dropout mask per layer step", "option"
    ),
    "mt iiet branch scale": mt(
        "iiet",
        what="IIET r = 3, learned branch scale from 0.1",
        group="option",
        # against vanilla, and against vanilla with the same scale (does the scale help IIET more than vanilla?)
        references=("mt euler", "mt euler branch scale"),
        branch_scale=0.1,
    ),
    "mt euler branch scale": mt(
        "euler", what="vanilla encoder, learned branch scale from 0.1", group="option", branch_scale=0.1
    ),
}
for encoder, name in (("euler", "euler"), ("iiet", "iiet")):
    MT_ARMS[f"mt {name} gpt2 init"] = mt(
        encoder, ("--model.arch.init", "gpt2"), f"{MT_ARMS[f'mt {name}'].what}, GPT-2 init", "option"
    )
    MT_ARMS[f"mt {name} warmup 800"] = mt(
        encoder, ("--model.optim.warmup_steps", "800"), f"{MT_ARMS[f'mt {name}'].what}, warmup 800", "option"
    )
ARMS.update(MT_ARMS)
# The scale of the stream entering the stack (DecoderConfig.embed_scale), for both models: the screen that chose
# the shipped value, and the rows without it (embed_scale 1, Llama's).
for scale in ("1.0", "4.0", "11.3", "16.0", "32.0"):
    ARMS[f"euler stream {scale}"] = Arm(
        lm("euler"), (f"--model.arch.embed_scale={scale}",), f"vanilla, embed_scale {scale}", 1, "stream"
    )
    ARMS[f"iiet stream {scale}"] = Arm(
        lm("iiet"), (f"--model.arch.embed_scale={scale}",), f"IIET r = 3, embed_scale {scale}", 3, "stream"
    )
DEFAULT_ARMS = [
    "euler",
    "iiet",
    "iiet r=2",
    "rk2",
    "rk4",
    "pcformer",
    "euler 3x steps",
    "euler 12 layers",
    "euler stream 1.0",
    "iiet stream 1.0",
]


def resolved_config(args: list[str]) -> dict:
    """`python -m lit_iiet fit ARGS --print_config`, in this process, as a dict."""
    from lit_iiet.cli import main as lit_iiet_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        lit_iiet_main(["fit", *args, "--print_config"])
    config = yaml.safe_load(out.getvalue())
    if not isinstance(config, dict):
        raise SystemExit(f"scheme_study: python -m lit_iiet fit {' '.join(args)} does not parse: {err.getvalue()}")
    return config


@functools.cache
def arm_config(arm: str, extra: tuple[str, ...]) -> str:
    """The config an arm's runs share (its files, overrides and the study's extra overrides, resolved with every
    default), as sorted JSON, without the run folder; the lr and the seed are the runs' own. Resolved once per arm:
    parsing costs a second or more."""
    a = ARMS[arm]
    config = resolved_config([*(arg for config in a.configs for arg in ("--config", config)), *a.overrides, *extra])
    config["trainer"].pop("default_root_dir", None)
    config.pop("seed_everything", None)
    config["model"]["init_args"]["optim"].pop("lr", None)
    return json.dumps(config, sort_keys=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


CSV_FIELDS = [
    "arm",
    "seed",
    "lr",
    "stage",
    "val_loss",
    "test_loss",
    "evals_per_token",
    "fit_seconds",
    "threads",
    "date",
    "fingerprint",
    "reference",
    "command",
]
SCORES = {"lm": [], "mt": ["test_bleu", "test_chrf"]}  # further columns of a task's CSV, after test_loss


class Store:
    """A study's per-run CSV in the repository (docs/results/NAME.csv): a run recorded there is finished on any
    machine, so a study continues on a fresh checkout where the last one stopped. Rows are added as runs finish."""

    def __init__(self, path: Path, task: str = "lm") -> None:
        self.path, self.scores = path, SCORES[task]
        self.fields = CSV_FIELDS[:6] + self.scores + CSV_FIELDS[6:]
        self.rows = list(csv.DictReader(open(path, newline=""))) if path.exists() else []

    def find(self, run: "Run") -> dict | None:
        for row in self.rows:
            key = (row["arm"], float(row["lr"]), int(row["seed"]), row["stage"])
            if key == (run.arm, run.lr, run.seed, run.stage):
                if row["fingerprint"] != run.fingerprint():
                    raise SystemExit(
                        f"scheme_study: {self.path} records {run.arm} lr {run.lr:g} seed {run.seed} ({run.stage}) "
                        f"made by another command or config ({row['command']}); use another --results name"
                    )
                return row
        return None

    def add(self, run: "Run", result: dict) -> None:
        if self.find(run) is not None:
            return
        self.rows.append(
            {
                "arm": run.arm,
                "seed": run.seed,
                "lr": repr(run.lr),
                "stage": run.stage,
                "val_loss": f"{result['val_loss']:.5f}",
                "test_loss": f"{result['test_loss']:.5f}",
                **{name: f"{result[name]:.2f}" for name in self.scores},
                "evals_per_token": f"{result['evals_per_token']:.3f}",
                "fit_seconds": f"{result['fit_seconds']:.1f}",
                "threads": result["threads"],
                "date": result["date"],
                "fingerprint": result["fingerprint"],
                "reference": ";".join(ARMS[run.arm].references),
                "command": result["command"],
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


@dataclass
class Run:
    arm: str
    lr: float
    seed: int
    out: Path
    extra: tuple[str, ...] = ()
    """--override arguments, applied to every arm of the study."""
    stage: str = "final"
    """tune (chooses the lr) or final (reported): a tuning run is never reused as a final run."""
    store: Store | None = None
    args: list[str] = field(init=False)

    def __post_init__(self) -> None:
        a = ARMS[self.arm]
        self.args = [
            *(arg for config in a.configs for arg in ("--config", config)),
            *a.overrides,
            *self.extra,
            "--model.optim.lr",
            repr(self.lr),
            "--seed_everything",
            str(self.seed),
        ]

    @property
    def dir(self) -> Path:
        return self.out / "runs" / slug(self.arm) / f"{self.stage}_lr{self.lr:g}_seed{self.seed}"

    def fingerprint(self) -> str:
        """The arm's whole config as `fit` resolves it (`arm_config`), with this run's lr and seed: a finished run
        is reused only while that is unchanged, however the config files are laid out."""
        arm = arm_config(self.arm, self.extra)
        return hashlib.sha256(json.dumps([arm, repr(self.lr), self.seed]).encode()).hexdigest()[:16]

    def result(self, required: bool = False) -> dict | None:
        path = self.dir / "result.json"
        row = self.store.find(self) if self.store is not None else None
        if not path.exists() and row is not None:  # finished on another machine: the committed CSV has it
            numbers = ("val_loss", "test_loss", "evals_per_token", "fit_seconds", *SCORES[ARMS[self.arm].task])
            return {**row, **{k: float(row[k]) for k in numbers}, "convergence": {}}
        if not path.exists():
            if required:
                raise SystemExit(f"scheme_study: run {self.dir} has not finished; run the study without --report_only")
            return None
        result = json.loads(path.read_text())
        if result["fingerprint"] != self.fingerprint():
            raise SystemExit(
                f"scheme_study: {path} was made by another command or config ({result['command']}); "
                f"move it away or use another --out"
            )
        return result

    def command(self, threads: int) -> list[str]:
        spec = {
            "arm": self.arm,
            "lr": self.lr,
            "seed": self.seed,
            "out": str(self.out),
            "extra": list(self.extra),
            "stage": self.stage,
        }
        return [
            sys.executable,
            "-m",
            "benchmarks.scheme_study",
            "--run_one",
            json.dumps(spec),
            "--threads",
            str(threads),
        ]


def run_one(spec: dict, threads: int) -> None:
    """fit, then test the last checkpoint, in this process; write result.json last (it marks the run finished)."""
    import torch

    torch.set_num_threads(threads)
    run = Run(spec["arm"], spec["lr"], spec["seed"], Path(spec["out"]), tuple(spec["extra"]), spec["stage"])
    task = ARMS[run.arm].task
    outcome = fit_and_test(run.args, run.dir, task)
    result = {
        "arm": run.arm,
        "lr": run.lr,
        "seed": run.seed,
        "threads": threads,
        "command": shlex.join(["python", "-m", "lit_iiet", "fit", *run.args]),  # pastes into a shell as it is
        "fingerprint": run.fingerprint(),
        "val_loss": outcome["val_loss"],
        "val_curve": outcome["val_curve"],
        "test_loss": outcome["test_loss"],
        **{name: outcome[name] for name in SCORES[task]},
        "evals_per_token": outcome["iiet"]["iiet/evals_per_token"],
        "fit_seconds": outcome["fit_seconds"],
        "convergence": {
            k: v for k, v in outcome["iiet"].items() if k.startswith(("iiet/increment/", "iiet/contraction/"))
        },
        "date": date.today().isoformat(),
    }
    tmp = run.dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(run.dir / "result.json")


def execute(study: Study, jobs: int, threads: int) -> None:
    """Run what is not finished yet, `jobs` processes at a time; a failed run stops the study with its log.
    An arm's final runs start as soon as its own tuning has finished, before the other arms' tuning runs."""
    total = len(study.tuning()) + len(study.arms) * len(study.seeds)
    finished = 0
    for run in study.startable_runs():
        result = run.result()
        if result is not None:
            finished += 1
            if run.store is not None:  # finished while no study process was watching it: record it now
                run.store.add(run, result)
    print(f"scheme_study: {finished} of {total} runs finished before; running {total - finished}", flush=True)
    active: list[tuple[Run, subprocess.Popen, float]] = []
    todo = None  # the runs to start, recomputed when a run ends (it may complete an arm's tuning)
    while True:
        if todo is None:
            busy = {run.dir for run, _, _ in active}
            todo = [r for r in study.startable_runs() if r.result() is None and r.dir not in busy]
            if not todo and not active:
                return
        while todo and len(active) < jobs:
            run = todo.pop(0)
            run.dir.mkdir(parents=True, exist_ok=True)
            log = open(run.dir / "log.txt", "a")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
            active.append(
                (
                    run,
                    subprocess.Popen(run.command(threads), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env),
                    time.time(),
                )
            )
        time.sleep(2)
        for item in list(active):
            run, proc, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            todo = None
            if proc.returncode != 0:
                for _, other, _ in active:
                    other.terminate()
                raise SystemExit(
                    f"scheme_study: run {run.dir} failed (exit {proc.returncode}); see {run.dir / 'log.txt'}"
                )
            r = run.result()
            if run.store is not None:
                run.store.add(run, r)
            print(
                f"  {run.arm:18s} lr {run.lr:g} seed {run.seed}: val {r['val_loss']:.4f} test {r['test_loss']:.4f} "
                f"({time.time() - started:.0f} s)",
                flush=True,
            )


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.3f}" if math.isnan(s) else f"{m:.3f} ± {s:.3f}"


class Study:
    """The runs of a study and their results: each arm's tuning runs, its chosen lr, its final runs."""

    def __init__(
        self,
        arms: list[str],
        lrs: list[float],
        tune_seeds: list[int],
        seeds: list[int],
        out: Path,
        extra: tuple[str, ...] = (),
        name: str = "study",
        store: Store | None = None,
    ):
        self.arms, self.lrs, self.tune_seeds, self.seeds, self.out, self.extra = (
            arms,
            lrs,
            tune_seeds,
            seeds,
            out,
            extra,
        )
        self.name, self.store = name, store

    def run(self, arm: str, lr: float, seed: int, stage: str = "final") -> Run:
        return Run(arm, lr, seed, self.out, self.extra, stage, self.store)

    def tuning(self) -> list[Run]:
        """The tuning runs; none where the grid has one lr (nothing to choose)."""
        if len(self.lrs) == 1:
            return []
        return [self.run(a, lr, s, "tune") for a in self.arms for lr in self.lrs for s in self.tune_seeds]

    def tuned(self, arm: str) -> dict[float, list[float]]:
        """Final val/loss of each lr of the grid, over the tuning seeds."""
        return {
            lr: [self.run(arm, lr, s, "tune").result(required=True)["val_loss"] for s in self.tune_seeds]
            for lr in self.lrs
        }

    def chosen_lr(self, arm: str) -> float:
        if len(self.lrs) == 1:
            return self.lrs[0]
        tuned = self.tuned(arm)
        return min(self.lrs, key=lambda lr: statistics.mean(tuned[lr]))

    def final(self, arm: str) -> list[Run]:
        return [self.run(arm, self.chosen_lr(arm), s) for s in self.seeds]

    def startable_runs(self) -> list[Run]:
        """The final runs of each arm whose tuning has finished (its lr is chosen), seed by seed across those arms,
        then every tuning run: an interrupted study leaves complete pairs, and the arms listed first (the
        comparison that matters most) are decided first."""
        tuning = self.tuning()
        tuned = [a for a in self.arms if all(r.result() is not None for r in tuning if r.arm == a)]
        return [self.run(a, self.chosen_lr(a), seed) for seed in self.seeds for a in tuned] + tuning


def contraction(runs: list[Run]) -> str:
    """Each layer's contraction estimate at the last validation, mean over the runs ("" for non-IIET arms)."""
    per_run = [r.result()["convergence"] for r in runs]
    keys = sorted((k for k in per_run[0] if k.startswith("iiet/contraction/")), key=lambda k: (len(k), k))
    return " / ".join(f"{statistics.mean(c[k] for c in per_run):.2f}" for k in keys)


def report(study: Study) -> None:
    """The study's CSV (runs finished before it existed are added), its regenerable table next to it
    (`benchmarks.results`), and under --out the detailed table NAME_detail.md and NAME.png."""
    from benchmarks.results import table

    out, seeds = study.out, study.seeds
    for run in study.tuning() + [r for a in study.arms for r in study.final(a)]:
        study.store.add(run, run.result(required=True))
    study.store.path.with_suffix(".md").write_text(table(study.name, study.store.rows))
    test = {a: [r.result()["test_loss"] for r in study.final(a)] for a in study.arms}
    val = {a: [r.result()["val_loss"] for r in study.final(a)] for a in study.arms}
    extra = f" Every run adds `{' '.join(study.extra)}`." if study.extra else ""
    base = study.arms[0]  # the reference, as in benchmarks.results
    lines = [
        f"Each arm at its chosen lr, seeds {', '.join(map(str, seeds))}: mean ± std over seeds.{extra} "
        f'"vs {base}" is the test/loss difference to {base} paired by seed (same data order and initial draw).',
        "",
        f"| arm | what | train FLOPs vs euler | lr (chosen on val) | val/loss | test/loss | test vs {base} | "
        "contraction per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in study.arms:
        gap = fmt([t - b for t, b in zip(test[arm], test[base])]) if arm != base else ""
        lines.append(
            f"| {arm} | {ARMS[arm].what} | {'' if ARMS[arm].flops is None else f'{ARMS[arm].flops:g}'} | "
            f"{study.chosen_lr(arm):g} | "
            f"{fmt(val[arm])} | {fmt(test[arm])} | {gap} | {contraction(study.final(arm))} |"
        )
    lines += [
        "",
        "Contraction: `iiet/contraction/<layer>` at the last validation (mean over seeds); at or above 1 that "
        "layer's iteration does not converge.",
        "",
        f"Tuning: final val/loss per peak learning rate (seeds {', '.join(map(str, study.tune_seeds))}); "
        "the chosen lr in bold.",
        "",
        "| arm | " + " | ".join(f"lr {lr:g}" for lr in study.lrs) + " |",
        "|---|" + "---|" * len(study.lrs),
    ]
    for arm in study.arms if study.tuning() else []:
        cells = [f"**{fmt(v)}**" if lr == study.chosen_lr(arm) else fmt(v) for lr, v in study.tuned(arm).items()]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    (out / f"{study.name}_detail.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(study, test)


def plot(study: Study, test: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tune, final) = plt.subplots(1, 2, figsize=(13, 0.9 + 0.35 * max(8, len(study.arms))))
    for arm in study.arms if study.tuning() else []:
        tuned = study.tuned(arm)
        tune.plot(study.lrs, [statistics.mean(tuned[lr]) for lr in study.lrs], "o-", label=arm)
    tune.set_xscale("log")
    tune.set_xlabel("peak learning rate")
    tune.set_ylabel("final val/loss (tuning seeds)")
    tune.set_title("learning-rate grid")
    tune.legend(fontsize=7)
    stats = [mean_std(test[a]) for a in study.arms]
    final.barh(range(len(study.arms)), [m for m, _ in stats], xerr=[0 if math.isnan(s) else s for _, s in stats])
    final.set_yticks(range(len(study.arms)), study.arms, fontsize=8)
    final.invert_yaxis()
    final.set_xlim(min(m for m, _ in stats) - 0.1, max(m for m, _ in stats) + 0.05)
    final.set_xlabel(f"test/loss at the chosen lr, mean ± std over seeds {', '.join(map(str, study.seeds))}")
    final.set_title("final")
    fig.tight_layout()
    fig.savefig(study.out / f"{study.name}.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/scheme_study", help="study folder: runs/, and the report files")
    parser.add_argument("--name", default="study", help="the study's files: NAME.csv and NAME.md, NAME.png")
    parser.add_argument(
        "--results",
        default=None,
        help="folder of NAME.csv (one row per run, written as runs finish; a run recorded there is not run again) "
        "and NAME.md; the committed studies use docs/results (default: --out)",
    )
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help=f"arms to run, of: {', '.join(ARMS)}")
    parser.add_argument(
        "--lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3, 8e-3], help="the learning-rate grid of every arm"
    )
    parser.add_argument(
        "--tune_seeds", nargs="+", type=int, default=[1, 2], help="seeds that choose the lr (on val/loss)"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[101, 102, 103], help="seeds of the final rows, at the chosen lr"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument(
        "--override",
        action="append",
        metavar="--KEY=VALUE",
        help="a fit option added to every run, e.g. --override=--model.arch.embed_scale=16 (repeatable)",
    )
    parser.add_argument("--report_only", action="store_true", help="write the table from finished runs, run nothing")
    parser.add_argument("--run_one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.run_one:
        return run_one(json.loads(args.run_one), threads)
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}; choose from: {', '.join(ARMS)}")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs} must be >= 1")
    reused = sorted(set(args.tune_seeds) & set(args.seeds))
    if reused and len(args.lrs) > 1:
        parser.error(f"--seeds and --tune_seeds share {reused}: a tuning run is not reused as a final run")
    tasks = sorted({ARMS[a].task for a in args.arms})
    if len(tasks) > 1:
        parser.error(f"--arms mixes tasks ({', '.join(tasks)}): one study compares arms of one task")
    store = Store(Path(args.results or args.out) / f"{args.name}.csv", tasks[0])
    study = Study(
        args.arms, args.lrs, args.tune_seeds, args.seeds, Path(args.out), tuple(args.override or ()), args.name, store
    )
    if not args.report_only:
        execute(study, args.jobs, threads)
    report(study)


if __name__ == "__main__":
    main()
