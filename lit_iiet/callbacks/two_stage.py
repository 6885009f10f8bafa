"""Two-stage training: vanilla (one iteration per layer) for most of the run, then the full IIET schedule.

Iteration 1 of IIET is the vanilla layer, so stage 1 trains a Transformer++ with IIET's parameters and stage 2
continues the same weights with every iteration. The optimizer state and the learning-rate schedule carry
on unchanged through the switch. The extra IIET training cost is that of the final (1 - switch_fraction) of
the steps: 25% of from-scratch IIET's at the default 0.75.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from lit_iiet.errors import UserInputError


class TwoStage(Callback):
    """Run the model at one iteration per layer until `switch_fraction` of the steps, then its full schedule."""

    def __init__(self, switch_fraction: float = 0.75, total_steps: int | None = None) -> None:
        """
        Args:
            switch_fraction: Fraction of the optimizer steps trained with one iteration per layer.
            total_steps: Steps the fraction refers to; None means trainer.max_steps.
        """
        if not 0.0 <= switch_fraction <= 1.0:
            raise UserInputError(f"switch_fraction={switch_fraction} must lie in [0, 1]")
        self.switch_fraction, self.total_steps = switch_fraction, total_steps
        self.switched = False
        self.full: list[int] | None = None

    def switch_step(self, trainer) -> int:
        total = self.total_steps or trainer.max_steps
        if total is None or total < 0:
            raise UserInputError("TwoStage needs trainer.max_steps or its own total_steps")
        return round(self.switch_fraction * total)

    def on_train_start(self, trainer, pl_module) -> None:
        update = pl_module.model.update
        if not update.implicit:
            raise UserInputError(f"TwoStage needs scheme 'iiet', not {update.cfg.scheme!r}")
        self.full = list(update.schedule)
        if not self.switched:
            update.set_schedule([1] * len(self.full))
            rank_zero_info(
                f"TwoStage: one iteration per layer until step {self.switch_step(trainer)}, then {self.full}"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self.switched and trainer.global_step >= self.switch_step(trainer):
            pl_module.model.update.set_schedule(self.full)
            self.switched = True
            pl_module.log("iiet/two_stage_switch", float(trainer.global_step))
            rank_zero_info(f"TwoStage: switched to the full schedule {self.full} at step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.model.update.set_schedule(self.full)  # whatever happened, the trained model is the full IIET

    def state_dict(self) -> dict:
        return {"switched": self.switched}

    def load_state_dict(self, state_dict: dict) -> None:
        self.switched = state_dict.get("switched", False)
