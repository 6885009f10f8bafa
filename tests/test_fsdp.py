"""Two CPU processes under FSDP (FULL_SHARD over gloo): training equals one process, and validation with text
samples and the influence logger, which run forward passes outside the step, completes on every rank."""

import subprocess
import sys

from conftest import ROOT, TINY

from lit_iiet.analysis.logs import read_scalars, read_texts
from lit_iiet.cli import main

STEPS = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.gradient_clip_val", "0.5"]
INFLUENCE = """
trainer:
  callbacks:
    - class_path: lit_iiet.callbacks.InfluenceLogger
      init_args: {batches: 1}
"""


def test_fsdp_trains_like_one_process_and_validates_with_samples_and_influence(tmp_path):
    main(["fit", *TINY, *STEPS, "--data.batch_size", "8", "--trainer.default_root_dir", str(tmp_path / "single")])
    (tmp_path / "influence.yaml").write_text(INFLUENCE)
    cmd = [sys.executable, "-m", "lit_iiet", "fit", *TINY, *STEPS, "--config", "conf/trainer/fsdp_cpu.yaml"]
    cmd += ["--config", str(tmp_path / "influence.yaml")]
    cmd += ["--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "fsdp")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout

    single, fsdp = read_scalars(tmp_path / "single"), read_scalars(tmp_path / "fsdp")
    for tag in ("train/loss", "val/loss"):
        assert [s for s, _ in single[tag]] == [s for s, _ in fsdp[tag]]
        for (_, a), (_, b) in zip(single[tag], fsdp[tag]):
            assert abs(a - b) < 1e-4, (tag, single[tag], fsdp[tag])
    assert [k for k in fsdp if k.startswith("iiet/influence/")] == ["iiet/influence/0", "iiet/influence/1"]
    (sample,) = read_texts(tmp_path / "fsdp", "val/sample")
    assert sample.startswith("```\nROMEO:") and len(sample) > len("```\nROMEO:\n```")
