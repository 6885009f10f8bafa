"""Every study table in docs/results/ regenerated from the committed per-run CSVs alone.

    python -m benchmarks.results             # rewrite docs/results/<name>.md from each docs/results/<name>.csv
    python -m benchmarks.results --check     # exit 1 if a committed .md is not its CSV's regeneration (tests)

A study CSV has one row per run: `arm`, `seed`, `lr`, `stage` (tune or final), `val_loss`, `test_loss`, any
further `test_<metric>` columns (translation: `test_bleu`, `test_chrf`), `command`, and whatever else the runner
records. Each arm's lr is the one with the lowest mean val_loss over its tune rows (tuning runs are never final
runs); the final rows at that lr are compared seed by seed with the arm's references: the arms its rows'
`reference` column names (several separated by ";"), else the first arm of the CSV. A comparison gives the mean of
the paired differences, its 95% interval (Student t) and the two-sided p. An interval that covers 0 reads "no
difference", whatever the means say.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
LOWER_IS_BETTER = ("loss",)  # metrics whose name contains one of these: lower is better; others (BLEU): higher


# --- Student t, from the regularized incomplete beta function -------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t (q > 0.5), by bisection."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1.0 - t_sf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences, its 95% interval and the two-sided p of a paired t test."""
    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "low": math.nan, "high": math.nan, "p": math.nan}
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    p = 2 * t_sf(abs(mean / se), n - 1) if se > 0 else (0.0 if mean else 1.0)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "p": p}


# --- tables ----------------------------------------------------------------------------------------------------


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def chosen_lrs(rows: list[dict]) -> dict[str, float]:
    """Each arm's lr: the lowest mean val_loss over its tune rows; an arm without tune rows has one final lr."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    chosen = {}
    for arm in arms:
        tune: dict[float, list[float]] = {}
        for r in rows:
            if r["arm"] == arm and r["stage"] == "tune":
                tune.setdefault(float(r["lr"]), []).append(float(r["val_loss"]))
        if tune:
            chosen[arm] = min(tune, key=lambda lr: statistics.mean(tune[lr]))
        else:
            lrs = {float(r["lr"]) for r in rows if r["arm"] == arm}
            if len(lrs) != 1:
                raise ValueError(f"arm {arm!r} has no tune rows and {len(lrs)} learning rates")
            chosen[arm] = lrs.pop()
    return chosen


def references(rows: list[dict]) -> dict[str, list[str]]:
    """The arms each arm is paired with: the `reference` column of its rows (";"-separated), else the first arm.
    An arm is never its own reference; a reference may have no rows yet (a study that has not run it)."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    named: dict[str, list[str]] = {}
    for r in rows:
        for ref in filter(None, (part.strip() for part in (r.get("reference") or "").split(";"))):
            named.setdefault(r["arm"], [])
            if ref not in named[r["arm"]]:
                named[r["arm"]].append(ref)
    return {a: [ref for ref in named.get(a, [arms[0]]) if ref != a] for a in arms}


def table(name: str, rows: list[dict]) -> str:
    """The markdown of one study: tuning grid, final rows, paired comparisons of each arm with its references."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    pairs = [(arm, ref) for arm, refs in references(rows).items() for ref in refs]
    unrun = [(arm, ref) for arm, ref in pairs if ref not in arms]
    pairs = [pair for pair in pairs if pair not in unrun]
    lrs = chosen_lrs(rows)
    metrics = ["val_loss", "test_loss"] + [k for k in rows[0] if k.startswith("test_") and k != "test_loss"]
    final = {
        a: {int(r["seed"]): r for r in rows if r["arm"] == a and r["stage"] == "final" and float(r["lr"]) == lrs[a]}
        for a in arms
    }
    out = [
        f"# {name}",
        "",
        f"Generated by `python -m benchmarks.results` from `{name}.csv` ({len(rows)} runs). Do not edit.",
        "",
    ]

    tune_lrs = sorted({float(r["lr"]) for r in rows if r["stage"] == "tune"})
    if tune_lrs:
        out += ["Tuning: mean val_loss over the tune seeds per learning rate; **bold** is the arm's chosen lr.", ""]
        out += ["| arm | " + " | ".join(f"lr {lr:g}" for lr in tune_lrs) + " |", "|---|" + "---|" * len(tune_lrs)]
        for arm in arms:
            cells = []
            for lr in tune_lrs:
                vals = [
                    float(r["val_loss"])
                    for r in rows
                    if r["arm"] == arm and r["stage"] == "tune" and float(r["lr"]) == lr
                ]
                cell = f"{statistics.mean(vals):.3f} ({len(vals)})" if vals else ""
                cells.append(f"**{cell}**" if vals and lr == lrs[arm] else cell)
            out.append(f"| {arm} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["Final runs at each arm's chosen lr (mean ± std over seeds):", ""]
    out += ["| arm | lr | seeds | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for arm in arms:
        runs = final[arm].values()
        cells = []
        for m in metrics:
            values = [float(r[m]) for r in runs if r.get(m) not in (None, "")]
            kept = f" ({len(values)} of {len(runs)} runs)" if 0 < len(values) < len(runs) else ""
            cells.append(_fmt(values, 2 if "loss" not in m else 3) + kept)
        out.append(f"| {arm} | {lrs[arm]:g} | {len(final[arm])} | " + " | ".join(cells) + " |")
    out.append("")

    compared = [m for m in metrics if m != "val_loss"] if pairs else []
    refs = list(dict.fromkeys(ref for _, ref in pairs + unrun))  # labels stay when a reference gets rows
    against = f"`{refs[0]}` (arm minus {refs[0]})" if len(refs) == 1 else "each arm's reference (arm minus reference)"
    out += (
        []
        if not compared
        else [
            f"Paired by seed against {against}: mean difference, 95% interval, p. "
            "An interval that covers 0 is no difference.",
            "",
            "| arm | metric | pairs | difference | 95% interval | p | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
    )
    for arm, reference in pairs:
        label = arm if len(refs) == 1 else f"{arm} vs {reference}"
        seeds = sorted(set(final[arm]) & set(final[reference]))
        for m in compared:
            diffs = [
                float(final[arm][s][m]) - float(final[reference][s][m])
                for s in seeds
                if final[arm][s].get(m) and final[reference][s].get(m)
            ]
            if not diffs:
                continue
            d = paired(diffs)
            lower_better = any(word in m for word in LOWER_IS_BETTER)
            digits = 3 if "loss" in m else 2
            interval = f"[{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] | {d['p']:.3g}"
            if d["n"] < 2:  # one pair has no spread: nothing is decided yet
                interval, verdict = "– | –", "undecided (one pair)"
            elif d["low"] <= 0 <= d["high"]:
                verdict = "no difference"
            else:
                verdict = "better" if (d["mean"] < 0) == lower_better else "worse"
            out.append(f"| {label} | {m} | {d['n']} | {d['mean']:+.{digits}f} | {interval} | {verdict} |")
    if unrun:
        out += ["", "Not compared (the reference has no rows): " + "; ".join(f"{a} vs {r}" for a, r in unrun) + "."]
    commands = sorted({r["command"] for r in rows if r.get("command")})
    out += ([""] if compared or unrun else []) + [
        f"Commands ({len(commands)} distinct) are in the CSV's `command` column."
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    stale = []
    for path in sorted(args.dir.glob("*.csv")):
        text = table(path.stem, read(path))
        target = path.with_suffix(".md")
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
    if stale:
        print(
            f"not the regeneration of their CSV: {', '.join(stale)}; run python -m benchmarks.results", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
