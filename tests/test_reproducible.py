"""The same command gives the same run: tokenizer training, data order, initialisation and every loss."""

import pytest
from conftest import TINY

from lit_iiet.analysis.logs import read_scalars
from lit_iiet.cli import main


@pytest.mark.slow
def test_two_identical_runs_give_identical_losses(tmp_path, monkeypatch):
    """Each run trains its own tokenizer in an empty cache, then 6 steps: every logged loss is bit-equal."""
    runs = []
    for name in ("a", "b"):
        monkeypatch.setenv("LIT_IIET_CACHE", str(tmp_path / name / "cache"))
        main(
            [
                "fit",
                *TINY,
                "--trainer.max_steps",
                "6",
                "--model.val_sample_prompt",
                "null",
                "--trainer.default_root_dir",
                str(tmp_path / name),
            ]
        )
        runs.append(read_scalars(tmp_path / name))
    for tag in ("train/loss", "val/loss"):
        assert len(runs[0][tag]) >= 2 and runs[0][tag] == runs[1][tag], tag
    tokenizers = [next((tmp_path / n / "cache" / "tokenizers").glob("*.model")).read_bytes() for n in ("a", "b")]
    assert tokenizers[0] == tokenizers[1]
