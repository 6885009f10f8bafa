"""Iteration influence, IIAD distillation (E-IIET) and two-stage training."""

import pytest
import torch
from conftest import TINY
from lightning.pytorch import Callback

from lit_iiet.analysis.convergence import solver_residuals
from lit_iiet.analysis.influence import (
    ablation_influence,
    iteration_stats,
    relative_compute,
    schedule_from_influence,
)
from lit_iiet.analysis.logs import read_scalars
from lit_iiet.callbacks import IIAD, TwoStage
from lit_iiet.callbacks.influence import heatmap_image
from lit_iiet.checkpoint import TOKENIZER_KEY
from lit_iiet.cli import build_cli, main
from lit_iiet.errors import UserInputError
from lit_iiet.models import LanguageModel
from lit_iiet.nn.decoder import Decoder, DecoderConfig
from lit_iiet.nn.generate import generate
from lit_iiet.nn.ode import Branch, ODEConfig

# embed_scale 1 (Llama's): under the shipped sqrt(d_model) stream scale a model trained for a few steps has a small G
# next to its stream, so its iterations barely change the logits, and the distillation tests would see nothing.
THREE_LAYERS = ["--model.arch.n_layers", "3", "--model.ode.iters", "3", "--model.arch.embed_scale", "1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A real IIET (r = 3) checkpoint: 12 steps of the CLI on the shipped corpus."""
    run = tmp_path_factory.mktemp("teacher")
    main(
        [
            "fit",
            *TINY,
            *THREE_LAYERS,
            "--trainer.max_steps",
            "12",
            "--trainer.val_check_interval",
            "12",
            "--trainer.default_root_dir",
            str(run),
        ]
    )
    return run / "checkpoints" / "last.ckpt"


def calibration(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (4, 33), generator=g) for _ in range(n)]


def test_threshold_0_keeps_everything_and_1_keeps_one_iteration(teacher):
    model = LanguageModel.load_from_checkpoint(teacher).model
    stats = iteration_stats(model, calibration())
    assert stats.schedule == [3, 3, 3] and all(v > 0 for v in stats.refinement)
    assert len(stats.increments) == 3 and all(len(row) == 3 for row in stats.increments)
    assert schedule_from_influence(stats.refinement, stats.schedule, threshold=0.0) == [3, 3, 3]
    assert schedule_from_influence(stats.refinement, stats.schedule, threshold=1.0) == [1, 1, 1]
    middle = schedule_from_influence(stats.refinement, stats.schedule, threshold=0.999)
    assert middle.count(3) == 1 and middle[stats.refinement.index(max(stats.refinement))] == 3
    # A compute budget keeps the most influential layers first.
    assert schedule_from_influence(stats.refinement, stats.schedule, target_compute=5 / 9) == middle
    ablation_influence(model, calibration(), stats)
    assert len(stats.ablation) == 3 and model.update.schedule == [3, 3, 3]


def test_measures_on_known_iterates():
    """Refinement and increments on a model whose iterates we compute by hand (one layer, linear-free check)."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(64, n_layers=1, d_model=16, n_heads=2, max_seq_len=16), ODEConfig("iiet", 2))
    idx = torch.randint(0, 64, (2, 9))
    stats = iteration_stats(model, [idx])
    with model.update.trace(record=True) as trace:
        model(idx[:, :-1])
    y, z1, z2 = trace.states[0]
    expected = ((z2 - z1).norm(dim=-1) / z1.norm(dim=-1)).mean().item()
    assert stats.refinement[0] == pytest.approx(expected, rel=1e-5)
    assert stats.increments[0][0] == pytest.approx(((z1 - y).norm(dim=-1) / y.norm(dim=-1)).mean().item(), rel=1e-5)


def test_picard_residual_after_n_evaluations_is_the_next_increment():
    """||Phi(z_n) - z_n|| = ||z_(n+1) - z_n||: the solver comparison and the logged increments agree for Picard,
    and Anderson's residual differs (it is another iterate) while n = 1 is the same vanilla step for both."""
    torch.manual_seed(0)
    model = Decoder(
        DecoderConfig(64, n_layers=2, d_model=16, n_heads=2, max_seq_len=16, embed_scale=8.0), ODEConfig("iiet", 3)
    )
    batches = [torch.randint(0, 64, (2, 11))]
    increments = iteration_stats(model, batches).increments
    residuals = solver_residuals(model, batches, max_evals=3)
    for layer in (0, 1):
        assert residuals["picard"][layer][:2] == pytest.approx(increments[layer][1:], rel=1e-4)
        assert residuals["anderson"][layer][0] == pytest.approx(residuals["picard"][layer][0], rel=1e-6)
        assert residuals["anderson"][layer][2] != pytest.approx(residuals["picard"][layer][2], rel=1e-3)


def test_relative_compute_equals_counted_evaluations(monkeypatch):
    calls = []
    real_call = Branch.__call__
    monkeypatch.setattr(Branch, "__call__", lambda self, z, e: calls.append(e) or real_call(self, z, e))
    model = Decoder(DecoderConfig(64, n_layers=4, d_model=16, n_heads=2, max_seq_len=16), ODEConfig("iiet", 3)).eval()
    idx = torch.randint(0, 64, (1, 8))
    model(idx)
    full_count = len(calls)
    calls.clear()
    model.update.set_schedule([3, 1, 2, 1])
    model(idx)
    assert full_count == 12 and len(calls) == 7
    assert relative_compute([3, 1, 2, 1], [3, 3, 3, 3]) == pytest.approx(len(calls) / full_count)
    assert model.update.total_evals() == 7


def test_schedule_rule_rejects_bad_arguments():
    with pytest.raises(UserInputError, match="exactly one"):
        schedule_from_influence([1.0], [3])
    with pytest.raises(UserInputError, match="threshold=1.5"):
        schedule_from_influence([1.0], [3], threshold=1.5)
    with pytest.raises(UserInputError, match="target_compute=0.1 must lie in"):
        schedule_from_influence([1.0, 0.5], [3, 3], target_compute=0.1)


def test_distillation_loss_is_zero_when_student_equals_teacher(teacher):
    iiad = IIAD(str(teacher), threshold=0.0, hidden_mse_weight=1.0)
    iiad.teacher = LanguageModel.load_from_checkpoint(teacher).eval()
    student = LanguageModel.load_from_checkpoint(teacher).eval()
    student.add_loss_terms(iiad.distillation_terms, hidden_states=True)  # as IIAD does at fit start
    terms = student.loss_terms(calibration(1)[0])
    assert terms["kd"].item() == 0.0 and terms["hidden_mse"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(terms["ce"].item(), abs=1e-5)
    student.model.update.set_schedule([1, 1, 1])  # a pruned student differs from the teacher
    assert student.loss_terms(calibration(1)[0])["kd"].item() > 1e-6


def test_iiad_prunes_distils_and_never_touches_the_teacher(teacher, tmp_path):
    before = {k: v.clone() for k, v in torch.load(teacher, weights_only=True)["state_dict"].items()}
    run = tmp_path / "eiiet"
    main(
        [
            "fit",
            *TINY,
            *THREE_LAYERS,
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "4",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.callbacks+=lit_iiet.callbacks.IIAD",
            f"--trainer.callbacks.teacher={teacher}",
            "--trainer.callbacks.threshold=0.999",
            "--trainer.callbacks.hidden_mse_weight=0.1",
            "--trainer.callbacks+=lit_iiet.callbacks.InfluenceLogger",
        ]
    )
    after = torch.load(teacher, weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher file is unchanged
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    schedule = ckpt["hyper_parameters"]["ode"]["iters"]
    assert sorted(schedule) == [1, 1, 3]
    assert (
        ckpt[TOKENIZER_KEY] == torch.load(teacher, weights_only=True)[TOKENIZER_KEY]
    )  # the data's tokenizer travels on
    assert any(not torch.equal(before[k], ckpt["state_dict"][k]) for k in before)  # the student trained
    scalars = read_scalars(run)
    for tag in ("train/ce", "train/kd", "train/hidden_mse", "train/loss", "iiet/influence/0", "iiet/influence/2"):
        assert tag in scalars, tag
    # The E-IIET checkpoint loads with its schedule and generates through the cache.
    student = LanguageModel.load_from_checkpoint(run / "checkpoints/last.ckpt").eval()
    assert student.model.schedule == schedule and [len(s) for s in student.model.init_cache(1, 8)] == schedule
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(
        generate(student.model, prompt, 6, temperature=0.0),
        generate(student.model, prompt, 6, temperature=0.0, use_cache=False),
    )


def test_teacher_gets_no_gradient(teacher):
    iiad = IIAD(str(teacher), threshold=0.5)
    iiad.teacher = LanguageModel.load_from_checkpoint(teacher).eval().requires_grad_(False)
    student = LanguageModel.load_from_checkpoint(teacher)
    student.model.update.set_schedule([1, 3, 1])
    student.add_loss_terms(iiad.distillation_terms)
    student.loss_terms(calibration(1)[0])["loss"].backward()
    assert all(p.grad is None for p in iiad.teacher.parameters())
    assert all(p.grad is not None for p in student.model.blocks.parameters())


class ScheduleRecorder(Callback):
    """Records the schedule each optimizer step ran with, and the logits of the model at step 1."""

    def __init__(self):
        self.schedules, self.state, self.logits, self.batch = [], None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.schedules.append(list(pl_module.model.update.schedule))
        if trainer.global_step == 1:
            pl_module.eval()
            with torch.no_grad():
                self.logits = pl_module.model(batch[:, :-1]).clone()
            pl_module.train()
            self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            self.batch = batch.clone()


def test_two_stage_switches_at_the_right_step_and_is_vanilla_before(tmp_path):
    cli = build_cli(
        run=False,
        args=[
            *TINY,
            *THREE_LAYERS,
            "--trainer.max_steps",
            "8",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.limit_val_batches",
            "0",
        ],
    )
    recorder, two_stage = ScheduleRecorder(), TwoStage(switch_fraction=0.75)
    cli.trainer.callbacks += [two_stage, recorder]
    optimizer_ids = []
    cli.trainer.callbacks.append(
        type(
            "OptimizerSpy",
            (Callback,),
            {"on_train_batch_start": lambda self, trainer, *a: optimizer_ids.append(id(trainer.optimizers[0]))},
        )()
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert recorder.schedules == [[1, 1, 1]] * 6 + [[3, 3, 3]] * 2
    assert len(set(optimizer_ids)) == 1  # one optimizer throughout: its state carries over the switch
    assert cli.model.model.update.schedule == [3, 3, 3]
    vanilla = Decoder(cli.model.model.cfg, ODEConfig("euler")).eval()
    vanilla.load_state_dict(recorder.state)
    with torch.no_grad():
        assert torch.equal(vanilla(recorder.batch[:, :-1]), recorder.logits)
    assert "iiet/two_stage_switch" in {k for k in cli.trainer.callback_metrics} | set(read_scalars(tmp_path))


def test_heatmap_image_shape_and_colours():
    image = heatmap_image([[0.0, 1.0], [0.5]], cell=4)
    assert image.shape == (3, 8, 8) and image.dtype.name == "uint8"
    assert tuple(image[:, 0, 0]) == (68, 1, 84) and tuple(image[:, 0, 4]) == (253, 231, 37)
    assert tuple(image[:, 4, 4]) == (128, 128, 128)  # the missing cell
