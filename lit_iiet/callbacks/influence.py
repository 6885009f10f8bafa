"""Log per-layer iteration influence during training: scalars and a layers x iterations heatmap."""

from __future__ import annotations

import numpy as np
from lightning.pytorch import Callback

from lit_iiet.analysis.influence import iteration_stats
from lit_iiet.callbacks.iiad import calibration_batches
from lit_iiet.media import log_image

# A few anchor colours of the viridis colour map, interpolated linearly (no plotting library needed).
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)


def heatmap_image(values: list[list[float]], cell: int = 24) -> np.ndarray:
    """A (3, H, W) uint8 image of a ragged layers x iterations table; missing cells are grey."""
    rows, cols = len(values), max(len(r) for r in values)
    flat = [v for r in values for v in r]
    low, high = min(flat), max(flat)
    image = np.full((rows, cols, 3), 128.0)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            t = (v - low) / (high - low) if high > low else 0.0
            pos = t * (len(_ANCHORS) - 1)
            k = min(int(pos), len(_ANCHORS) - 2)
            image[i, j] = _ANCHORS[k] + (pos - k) * (_ANCHORS[k + 1] - _ANCHORS[k])
    image = image.repeat(cell, axis=0).repeat(cell, axis=1)
    return image.astype(np.uint8).transpose(2, 0, 1)


class InfluenceLogger(Callback):
    """Every N validations: `iiet/influence/<layer>` (relative refinement), `iiet/cosine_drift/<layer>`, and an
    image `iiet/increments` (rows: layers, columns: iterations, colour: mean relative increment)."""

    def __init__(self, every_n_validations: int = 1, batches: int = 4) -> None:
        """
        Args:
            every_n_validations: Measure after every N-th validation.
            batches: Validation batches the measurement runs on.
        """
        self.every, self.batches, self.count = every_n_validations, batches, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not pl_module.model.update.implicit:
            return
        self.count += 1
        if self.count % self.every:
            return
        # Every rank measures (a sharded model's forward needs them all); rank zero logs.
        batches = calibration_batches(trainer, self.batches, pl_module.device)
        stats = iteration_stats(pl_module.model, batches, forward=pl_module.forward_module())
        if not trainer.is_global_zero:
            return
        metrics = {f"iiet/influence/{l}": v for l, v in enumerate(stats.refinement)}
        metrics.update({f"iiet/cosine_drift/{l}": v for l, v in enumerate(stats.cosine_drift)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log_image(trainer, "iiet/increments", heatmap_image(stats.increments), trainer.global_step)
