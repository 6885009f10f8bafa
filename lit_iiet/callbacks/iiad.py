"""IIAD (Iteration Influence-Aware Distillation): prune iterations where they matter little, distil the rest.

From a trained IIET teacher: measure each layer's iteration influence on calibration batches, keep the full
iteration budget only in layers above a threshold (or within a compute budget), start the student from the
teacher's weights with that schedule, and continue training it on

    loss = CE(student, data) + kd_weight * T^2 * KL(teacher_T || student_T) [+ hidden_mse_weight * mean_l MSE(h_l)]

with T the temperature and h_l the layer outputs. The paper's exact metric and loss were not recoverable; these
are the documented defaults. The teacher is frozen and never
changes; the student's checkpoints carry the pruned schedule, so they load and generate like any other. The
distillation terms reach the student's loss through `LanguageModel.add_loss_terms`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_iiet.analysis.influence import (
    ablation_influence,
    iteration_stats,
    relative_compute,
    schedule_from_influence,
)
from lit_iiet.errors import UserInputError


def calibration_batches(trainer, n: int, device) -> list[Tensor]:
    """The first n validation batches (the same ones every time: the validation loader does not shuffle)."""
    batches = []
    for batch in trainer.datamodule.val_dataloader():
        if len(batches) == n:
            break
        batches.append(batch.to(device))
    return batches


class IIAD(Callback):
    """Distil a full IIET teacher checkpoint into an iteration-pruned student (E-IIET)."""

    def __init__(
        self,
        teacher: str,
        threshold: float | None = 0.5,
        target_compute: float | None = None,
        metric: Literal["refinement", "cosine_drift", "ablation"] = "refinement",
        calibration_batches: int = 8,
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        hidden_mse_weight: float = 0.0,
    ) -> None:
        """
        Args:
            teacher: Checkpoint of the trained IIET teacher (a LanguageModel with scheme iiet).
            threshold: Keep a layer's iterations when its normalized influence is above this (0 keeps all,
                1 keeps one iteration per layer); set it to null to use target_compute instead.
            target_compute: Instead of a threshold: the largest fraction of the teacher's F-evaluations to keep.
            metric: Influence measure: refinement (||z_r - z_1|| / ||z_1||), cosine_drift, or ablation (loss
                increase when the layer alone runs one iteration).
            calibration_batches: Validation batches on which influence is measured.
            kd_weight: lambda, the weight of the KL term.
            temperature: T, the softmax temperature of teacher and student in the KL term (scaled by T^2).
            hidden_mse_weight: Weight of the mean squared error between teacher and student layer outputs (0: off).
        """
        if (threshold is None) == (target_compute is None):
            raise UserInputError("IIAD: give exactly one of threshold and target_compute")
        if metric not in ("refinement", "cosine_drift", "ablation"):
            raise UserInputError(f"IIAD metric={metric!r}; choose refinement, cosine_drift or ablation")
        if temperature <= 0:
            raise UserInputError(f"IIAD temperature={temperature} must be > 0")
        self.teacher_path, self.threshold, self.target_compute, self.metric = teacher, threshold, target_compute, metric
        self.n_calibration, self.kd_weight, self.temperature = calibration_batches, kd_weight, temperature
        self.hidden_mse_weight = hidden_mse_weight
        self.teacher = None
        self.schedule: list[int] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        from lit_iiet.models.lm import LanguageModel

        self.teacher = LanguageModel.from_checkpoint(self.teacher_path).requires_grad_(False)
        if not self.teacher.model.update.implicit:
            raise UserInputError(
                f"IIAD teacher {self.teacher_path!r} has scheme {self.teacher.model.ode.scheme!r}, not 'iiet'"
            )
        # The student starts as the teacher (on resume, the checkpoint's weights replace these afterwards) ...
        pl_module.load_weights(self.teacher.state_dict(), self.teacher_path)
        pl_module.check_embed_scale(self.teacher.hparams["arch"], self.teacher_path)
        if trainer.ckpt_path is not None:  # resuming: weights and the pruned schedule come from the checkpoint
            return
        teacher_model = self.teacher.model.to(pl_module.device)
        batches = calibration_batches(trainer, self.n_calibration, pl_module.device)
        stats = iteration_stats(teacher_model, batches)
        if self.metric == "ablation":
            ablation_influence(teacher_model, batches, stats)
        full = stats.schedule
        self.schedule = schedule_from_influence(stats.metric(self.metric), full, self.threshold, self.target_compute)
        self.stats = stats
        pl_module.set_schedule(self.schedule)  # ... with fewer iterations
        rank_zero_info(
            f"IIAD: {self.metric} per layer {[round(v, 4) for v in stats.metric(self.metric)]}; schedule {full} -> "
            f"{self.schedule} ({relative_compute(self.schedule, full):.0%} of the teacher's layer evaluations)"
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        self.teacher.to(pl_module.device)
        pl_module.add_loss_terms(self.distillation_terms, hidden_states=self.hidden_mse_weight > 0)

    def on_fit_end(self, trainer, pl_module) -> None:
        pl_module.remove_loss_terms(self.distillation_terms)

    def distillation_terms(
        self, batch: Tensor, logits: Tensor, states: dict[int, list[Tensor]]
    ) -> dict[str, tuple[Tensor, float]]:
        """The student's extra loss terms (`LanguageModel.add_loss_terms`): the temperature-scaled KL of its logits
        to the frozen teacher's and, with hidden_mse_weight, the MSE between their layer outputs."""
        hidden = self.hidden_mse_weight > 0
        with torch.no_grad(), self.teacher.model.update.trace(record=hidden) as teacher:
            t_logits = self.teacher.model(batch[:, :-1]).float()
        T = self.temperature
        t_logp, s_logp = (t_logits / T).log_softmax(-1), (logits.float() / T).log_softmax(-1)
        kd = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * T**2
        terms = {"kd": (kd, self.kd_weight)}
        if hidden:
            outputs = [(states[l][-1].float(), teacher.states[l][-1].float()) for l in teacher.states]
            terms["hidden_mse"] = (torch.stack([F.mse_loss(s, t) for s, t in outputs]).mean(), self.hidden_mse_weight)
        return terms

    def state_dict(self) -> dict:
        return {"schedule": self.schedule}

    def load_state_dict(self, state_dict: dict) -> None:
        self.schedule = state_dict.get("schedule")
