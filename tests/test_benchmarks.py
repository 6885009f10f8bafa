"""The scheme study runner: the same lr grid for every arm, chosen on validation, resumable, and refusing to mix runs."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

TINY_STUDY = [
    f"--override={option}"
    for option in (
        "--model.arch.n_layers=2",
        "--model.arch.d_model=32",
        "--model.arch.n_heads=2",
        "--model.arch.vocab_size=512",
        "--data.vocab_size=512",
        "--data.seq_len=32",
        "--data.batch_size=4",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--model.optim.warmup_steps=1",
    )
]


def study(tmp_path, *args):
    cmd = [sys.executable, "-m", "benchmarks.scheme_study", "--out", str(tmp_path), *args, *TINY_STUDY]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_scheme_study_tunes_on_validation_resumes_from_its_csv_and_refuses_changed_runs(tmp_path):
    results = tmp_path / "results"
    grid = ["--arms", "euler", "iiet", "--lrs", "1e-5", "3e-2", "--tune_seeds", "1", "--seeds", "2", "--jobs", "2"]
    grid += ["--results", str(results)]
    full = study(tmp_path, *grid)
    assert full.returncode == 0, full.stderr[-3000:]
    # 4 tuning runs and 2 final ones; an arm's final run may start once that arm's own tuning has finished
    assert "0 of 6 runs finished before; running 6" in full.stdout
    rows = list(csv.DictReader(open(results / "study.csv")))
    # 2 arms x 2 learning rates with tune seed 1, then final seed 2 at each arm's chosen lr: 4 steps at 1e-5
    # barely move a model, and the tuning runs are not reused as final runs.
    assert sorted((r["arm"], float(r["lr"]), int(r["seed"]), r["stage"]) for r in rows) == [
        ("euler", 1e-5, 1, "tune"),
        ("euler", 3e-2, 1, "tune"),
        ("euler", 3e-2, 2, "final"),
        ("iiet", 1e-5, 1, "tune"),
        ("iiet", 3e-2, 1, "tune"),
        ("iiet", 3e-2, 2, "final"),
    ]
    assert all(r["command"].startswith("python -m lit_iiet fit --config conf/lm/shakespeare.yaml") for r in rows)
    table = (results / "study.md").read_text()
    assert "| euler | 0.03 | 1 |" in table and "| iiet | 0.03 | 1 |" in table
    detail = (tmp_path / "study_detail.md").read_text()
    assert "| iiet | IIET r = 3, plain Picard iteration | 3 | 0.03 |" in detail
    assert (tmp_path / "study.png").stat().st_size > 10_000
    # A run that finished while no study process watched it (the study was killed) is recorded by the next one.
    (results / "study.csv").rename(tmp_path / "lost.csv")
    recorded = study(tmp_path, *grid)
    assert recorded.returncode == 0 and "6 of 6 runs finished before; running 0" in recorded.stdout
    assert sorted(map(tuple, map(dict.values, csv.DictReader(open(results / "study.csv"))))) == sorted(
        map(tuple, map(dict.values, rows))
    )
    # The CSV alone is the record: a fresh machine (no runs folder) runs nothing again.
    shutil.rmtree(tmp_path / "runs")
    again = study(tmp_path, *grid)
    assert again.returncode == 0 and "6 of 6 runs finished before; running 0" in again.stdout
    changed = study(tmp_path, *grid, "--override=--model.optim.weight_decay=0.0")
    assert changed.returncode != 0 and "made by another command or config" in changed.stderr
    reused = study(tmp_path, "--arms", "euler", "--lrs", "1e-5", "3e-2", "--tune_seeds", "1", "--seeds", "1")
    assert reused.returncode != 0 and "a tuning run is not reused as a final run" in reused.stderr


def test_an_arms_final_runs_may_start_once_its_own_tuning_has_finished(tmp_path):
    from benchmarks.scheme_study import Study

    study = Study(["euler", "iiet"], [1e-3, 2e-3], [1], [2, 3], tmp_path)

    def finish(arm, lr, val_loss):
        run = study.run(arm, lr, 1, "tune")
        run.dir.mkdir(parents=True)
        (run.dir / "result.json").write_text(json.dumps({"fingerprint": run.fingerprint(), "val_loss": val_loss}))

    def startable():
        return [(r.arm, r.lr, r.seed, r.stage) for r in study.startable_runs() if r.result() is None]

    tuning = [
        ("euler", 1e-3, 1, "tune"),
        ("euler", 2e-3, 1, "tune"),
        ("iiet", 1e-3, 1, "tune"),
        ("iiet", 2e-3, 1, "tune"),
    ]
    assert startable() == tuning  # no lr is chosen yet
    finish("euler", 1e-3, 4.0)
    finish("euler", 2e-3, 3.9)
    # euler's finals go before iiet's tuning: the arms listed first are decided first
    assert startable() == [("euler", 2e-3, 2, "final"), ("euler", 2e-3, 3, "final")] + tuning[2:]
    finish("iiet", 1e-3, 3.8)
    finish("iiet", 2e-3, 3.85)
    # seed by seed across arms: an interrupted study leaves complete pairs
    assert startable() == [
        ("euler", 2e-3, 2, "final"),
        ("iiet", 1e-3, 2, "final"),
        ("euler", 2e-3, 3, "final"),
        ("iiet", 1e-3, 3, "final"),
    ]


TINY_MT = [
    f"--override={option}"
    for option in (
        "--model.arch.d_model=32",
        "--model.arch.n_heads=2",
        "--model.arch.enc_layers=1",
        "--model.arch.dec_layers=1",
        "--model.arch.d_ff=64",
        "--model.arch.vocab_size=512",
        "--data.vocab_size=512",
        "--data.batch_size=4",
        "--data.max_tokens=null",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=1",
        "--model.optim.warmup_steps=1",
    )
]


def test_translation_study_records_test_bleu_and_chrf_of_the_written_hypotheses(tmp_path):
    import sacrebleu

    cmd = [sys.executable, "-m", "benchmarks.scheme_study", "--out", str(tmp_path), "--name", "mt"]
    mixed = subprocess.run([*cmd, "--arms", "mt euler", "euler"], cwd=ROOT, capture_output=True, text=True)
    assert mixed.returncode != 0 and "--arms mixes tasks (lm, mt)" in mixed.stderr
    args = ["--arms", "mt iiet branch scale", "--lrs", "2e-3", "--seeds", "1", "--jobs", "1", *TINY_MT]
    result = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = csv.DictReader(open(tmp_path / "mt.csv"))
    assert row["command"].startswith("python -m lit_iiet fit --config conf/mt/bible_fr_en.yaml")
    assert row["reference"] == "mt euler;mt euler branch scale"  # the arm's pairs, for benchmarks.results
    logs = tmp_path / "runs" / "mt_iiet_branch_scale" / "final_lr0.002_seed1" / "lightning_logs"
    (hyp_file,) = logs.glob("*/test.hyp.txt")
    hyps, refs = hyp_file.read_text().splitlines(), (hyp_file.parent / "test.ref.txt").read_text().splitlines()
    assert len(hyps) == 4  # one test batch
    assert float(row["test_bleu"]) == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    assert float(row["test_chrf"]) == round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    assert float(row["evals_per_token"]) == 3.0
    table = (tmp_path / "mt.md").read_text()
    assert "| mt iiet branch scale | 0.002 | 1 |" in table
    assert "(the reference has no rows): mt iiet branch scale vs mt euler; mt iiet branch scale vs mt euler" in table

    # collect_runs turns a folder of fit runs into a study CSV: seed and lr from each run's saved config, the last
    # val NLL and the requested scalars from its TensorBoard logs, the command from command.txt.
    from benchmarks.collect_runs import main as collect
    from lit_iiet.analysis.logs import read_scalars

    (logs.parent / "command.txt").write_text("python -m lit_iiet fit ...\n")
    (logs.parent.parent / "not_a_run").mkdir()
    out = tmp_path / "collected.csv"
    assert collect([str(logs.parent.parent), "--out", str(out), "--scalars", "iiet/increment/enc0/*"]) == 0
    (collected,) = csv.DictReader(open(out))
    scalars = read_scalars(logs)
    assert (collected["arm"], collected["lr"], collected["seed"], collected["step"]) == (
        logs.parent.name,
        "0.002",
        "1",
        "2",
    )
    assert float(collected["val_loss"]) == pytest.approx(float(row["val_loss"]), abs=1e-5)  # val/nll_loss
    assert float(collected["test_loss"]) == pytest.approx(float(row["test_loss"]), abs=1e-5)
    assert float(collected["iiet/increment/enc0/2"]) == pytest.approx(scalars["iiet/increment/enc0/2"][-1][1], rel=1e-4)
    assert collected["command"] == "python -m lit_iiet fit ..."
    assert collect([str(logs.parent.parent), "--out", str(out), "--reference", "euler"]) == 1


def test_gpu_check_runs_its_code_paths_on_a_cpu(tmp_path):
    # The GPU check's every section at a toy shape: training steps, decoding against HF Llama, Lightning fits
    # under FSDP (one gloo process) and the single-device strategy, and a fit killed by SIGKILL and resumed.
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {} and set(report["seconds"]) == {"train", "decode", "fsdp", "resume"}
    assert report["train"]["variants"]["eager"]["ratio"] > 1.0  # three F-evaluations per layer cost more than one
    assert report["decode"]["batches"]["2"]["greedy_agreement"] == 1.0  # fp32 on a CPU: HF's tokens exactly
    resume = report["resume"]
    assert resume["killed_returncode"] == -9 and resume["steps_equal"] and resume["max_abs_diff"] < 1e-6
    assert [s for s, _ in resume["resumed"]] == [1, 2, 3, 4]
    assert report["fsdp"]["32-true"]["max_abs_diff"] < 1e-4
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| eager | iiet r=3 |" in table and "kill -9 and resume: max |loss difference| over 4 steps" in table
