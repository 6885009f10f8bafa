"""`python -m lit_iiet.average_checkpoints` on a checkpoint folder as `fit` leaves it."""

import pytest
import torch
from conftest import TINY

from lit_iiet.average_checkpoints import main as average_main
from lit_iiet.cli import main


@pytest.mark.slow
def test_last_n_of_a_fit_folder_counts_each_step_once(tmp_path, capsys):
    """The folder holds step checkpoints and last.ckpt, a copy of the newest: --last 2 averages the two newest
    steps, each once, and keeps no optimizer state."""
    main(
        [
            "fit",
            *TINY,
            "--trainer.max_steps",
            "9",
            "--model.val_sample_prompt",
            "null",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--checkpoint.save_top_k",
            "-1",
            "--checkpoint.every_n_train_steps",
            "3",
        ]
    )
    folder = tmp_path / "checkpoints"
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    assert names == ["best-step=3.ckpt", "best-step=6.ckpt", "best-step=9.ckpt", "last.ckpt"], names
    average_main([str(folder), "--last", "2", "--output", str(tmp_path / "avg.ckpt")])
    avg = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    assert [p.rsplit("/", 1)[-1] for p in avg["averaged_from"]] == ["best-step=6.ckpt", "best-step=9.ckpt"]
    six, nine = (torch.load(folder / f"best-step={s}.ckpt", weights_only=True)["state_dict"] for s in (6, 9))
    for key, value in avg["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (six[key].double() + nine[key].double()).div(2).to(value.dtype))
    assert "optimizer_states" not in avg and avg["global_step"] == 9
