"""docs/results/: every committed table is the regeneration of its CSV, and the statistics are textbook values."""

import math
import statistics

import pytest

from benchmarks.results import RESULTS, main, paired, t_quantile, t_sf, table


def test_committed_tables_are_the_regeneration_of_their_csvs():
    assert main(["--check"]) == 0, "run python -m benchmarks.results and commit docs/results/"


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (11, 2.2010), (30, 2.0423)])
def test_student_t_quantiles_match_the_tables(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert 2 * t_sf(quantile, df) == pytest.approx(0.05, abs=1e-4)


def test_paired_interval_and_p_on_a_hand_computed_case():
    diffs = [-0.005, 0.196, 0.048]  # mean 0.0797, sd 0.1042: t = 1.325 with 2 degrees of freedom, p = 0.317
    d = paired(diffs)
    half = 4.302653 * statistics.stdev(diffs) / math.sqrt(3)
    assert d["mean"] == pytest.approx(0.079667, abs=1e-6)
    assert (d["low"], d["high"]) == pytest.approx((0.079667 - half, 0.079667 + half), abs=1e-5)
    assert d["p"] == pytest.approx(0.317, abs=2e-3)


def test_a_study_table_chooses_on_validation_and_says_no_difference_when_the_interval_covers_zero(tmp_path):
    header = "arm,seed,lr,stage,val_loss,test_loss,command\n"
    rows = [
        "euler,1,0.001,tune,4.0,9.9,c",  # lr chosen on val (4.0 < 4.2), never on test
        "euler,1,0.002,tune,4.2,1.0,c",
        "iiet,1,0.001,tune,4.3,1.0,c",
        "iiet,1,0.002,tune,4.1,9.9,c",
    ]
    for seed, (e, i) in enumerate([(3.90, 3.80), (3.95, 3.84), (3.92, 3.83), (3.88, 3.79)], start=10):
        rows += [f"euler,{seed},0.001,final,{e},{e},c", f"iiet,{seed},0.002,final,{i},{i},c"]
    rows += ["iiet,99,0.001,final,1.0,1.0,c"]  # a final run at another lr than the chosen one is left out
    (tmp_path / "s.csv").write_text(header + "\n".join(rows) + "\n")
    from benchmarks.results import read

    text = table("s", read(tmp_path / "s.csv"))
    assert "| euler | 0.001 | 4 |" in text and "| iiet | 0.002 | 4 |" in text
    assert "| iiet | test_loss | 4 | -0.098 |" in text and "| better |" in text  # the paired gap is steady
    noisy = [r.replace("iiet,11,0.002,final,3.84,3.84", "iiet,11,0.002,final,4.30,4.30") for r in rows]
    (tmp_path / "n.csv").write_text(header + "\n".join(noisy) + "\n")
    assert "| no difference |" in table("n", read(tmp_path / "n.csv"))
    one_pair = [r for r in rows if ",final," not in r or r.split(",")[1] == "10"]
    (tmp_path / "o.csv").write_text(header + "\n".join(one_pair) + "\n")
    assert "| iiet | test_loss | 1 | -0.100 | – | – | undecided (one pair) |" in table("o", read(tmp_path / "o.csv"))
    assert RESULTS.name == "results"


def test_an_arm_is_paired_with_each_reference_its_rows_name(tmp_path):
    header = "arm,seed,lr,stage,val_loss,test_loss,command,reference\n"
    rows = []
    for seed, (e, es, i) in enumerate([(3.90, 3.70, 3.60), (3.80, 3.71, 3.62), (3.95, 3.69, 3.58)], start=1):
        rows += [
            f"e,{seed},0.002,final,{e},{e},c,",
            f"e+s,{seed},0.002,final,{es},{es},c,",
            f"i+s,{seed},0.002,final,{i},{i},c,e; e+s",
        ]
    (tmp_path / "r.csv").write_text(header + "\n".join(rows) + "\n")
    from benchmarks.results import read

    text = table("r", read(tmp_path / "r.csv"))
    # e+s names no reference: the first arm; i+s names both. Differences: -0.183, -0.283 and -0.100 by hand.
    assert "| e+s vs e | test_loss | 3 | -0.183 |" in text
    assert "| i+s vs e | test_loss | 3 | -0.283 |" in text
    assert "| i+s vs e+s | test_loss | 3 | -0.100 | [-0.125, -0.075] |" in text
    assert "| e vs" not in text  # the first arm is nobody's pair with itself
    # a reference the study has not run (yet) is named, not silently dropped
    (tmp_path / "unrun.csv").write_text(header + "\n".join(rows).replace("e; e+s", "e; x") + "\n")
    text = table("unrun", read(tmp_path / "unrun.csv"))
    assert (
        "| i+s vs e | test_loss | 3 | -0.283 |" in text
        and "Not compared (the reference has no rows): i+s vs x." in text
    )
