"""Two CPU processes over gloo train exactly like one process on the same global batch: with DDP, and with FSDP
(FULL_SHARD), under which validation with text samples and the influence logger, forward passes outside the
step, must also complete on every rank."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

from lit_iiet.analysis.logs import read_scalars, read_texts
from lit_iiet.cli import main

STEPS = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
INFLUENCE = """
trainer:
  callbacks:
    - class_path: lit_iiet.callbacks.InfluenceLogger
      init_args: {batches: 1}
"""


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 8 windows per batch."""
    out = tmp_path_factory.mktemp("single")
    main(["fit", *TINY, *STEPS, "--data.batch_size", "8", "--trainer.default_root_dir", str(out)])
    return out


def two_processes(out, *config: str) -> None:
    # 4 windows each. Our sampler deals rank r the windows r, r+2, ... of the same shuffled order, so the two
    # halves make up the single process's batch.
    cmd = [sys.executable, "-m", "lit_iiet", "fit", *TINY, *STEPS, *config, "--data.batch_size", "4"]
    result = subprocess.run(
        cmd + ["--trainer.default_root_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout


def assert_same_losses(single, other) -> None:
    a, b = read_scalars(single), read_scalars(other)
    for tag in ("train/loss", "val/loss"):
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]]
        for (_, x), (_, y) in zip(a[tag], b[tag]):
            assert abs(x - y) < 1e-4, (tag, a[tag], b[tag])


def test_two_process_ddp_matches_one_process(single, tmp_path):
    two_processes(tmp_path / "ddp", "--config", "conf/trainer/ddp_cpu.yaml")
    assert_same_losses(single, tmp_path / "ddp")
    a = torch.load(single / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_fsdp_trains_like_one_process_and_validates_with_samples_and_influence(single, tmp_path):
    # Before a Block ran its whole layer step in its own forward, rank 1 read an empty shard of every weight;
    # with the sample and influence on rank zero alone, validation waited forever for the other rank.
    (tmp_path / "influence.yaml").write_text(INFLUENCE)
    two_processes(
        tmp_path / "fsdp", "--config", "conf/trainer/fsdp_cpu.yaml", "--config", str(tmp_path / "influence.yaml")
    )
    assert_same_losses(single, tmp_path / "fsdp")  # also with gradient clipping, through FSDP's own
    fsdp = read_scalars(tmp_path / "fsdp")
    assert [k for k in fsdp if k.startswith("iiet/influence/")] == ["iiet/influence/0", "iiet/influence/1"]
    (sample,) = read_texts(tmp_path / "fsdp", "val/sample")
    assert sample.startswith("```\nROMEO:") and len(sample) > len("```\nROMEO:\n```")
