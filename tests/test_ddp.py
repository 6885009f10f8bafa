"""Two CPU processes with DDP over gloo train exactly like one process on the same global batch."""

import subprocess
import sys

import torch
from conftest import ROOT, TINY

from lit_iiet.analysis.logs import read_scalars
from lit_iiet.cli import main

STEPS = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--model.val_sample_prompt", "null"]


def test_two_process_ddp_matches_one_process(tmp_path):
    # One process, 8 windows per batch.
    main(["fit", *TINY, *STEPS, "--data.batch_size", "8", "--trainer.default_root_dir", str(tmp_path / "single")])
    # Two processes (conf/trainer/ddp_cpu.yaml: gloo), 4 windows each. Our sampler deals rank r the windows r, r+2,
    # ... of the same shuffled order, so the two halves make up the single process's batch.
    cmd = [
        sys.executable,
        "-m",
        "lit_iiet",
        "fit",
        *TINY,
        *STEPS,
        "--config",
        "conf/trainer/ddp_cpu.yaml",
        "--data.batch_size",
        "4",
        "--trainer.default_root_dir",
        str(tmp_path / "ddp"),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout

    single, ddp = read_scalars(tmp_path / "single"), read_scalars(tmp_path / "ddp")
    for tag in ("train/loss", "val/loss"):
        assert [s for s, _ in single[tag]] == [s for s, _ in ddp[tag]]
        for (_, a), (_, b) in zip(single[tag], ddp[tag]):
            assert abs(a - b) < 1e-4, (tag, single[tag], ddp[tag])
    a = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
