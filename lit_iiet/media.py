"""Text samples, images and histograms for whichever loggers the Trainer has.

Lightning's `log` takes scalars only; each logger has its own call for anything else. TensorBoard and W&B get
their native calls. Any other logger (CSV, MLflow, ...) gets files beside its run, under `<log_dir>/media/`:
`<tag>/step_<n>.txt`, `.png` and `.csv` (a histogram's counts), so nothing logged is lost silently.
Call on every rank: only global rank zero writes.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


def _media_path(logger, tag: str, step: int, suffix: str) -> Path | None:
    root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    if root is None:
        return None
    path = Path(root) / "media" / tag.replace("/", "_") / f"step_{step}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """A (3, H, W) uint8 image as PNG (8-bit RGB, no filter), written without an imaging library."""
    _, h, w = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.transpose(1, 2, 0).reshape(h, 3 * w)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes()))
        + chunk(b"IEND", b"")
    )


def log_text(trainer, tag: str, text: str, step: int, markdown: bool = True) -> None:
    """markdown=False: plain text, shown verbatim (TensorBoard renders text as markdown)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text if markdown else f"```\n{text}\n```", step)
        elif isinstance(logger, WandbLogger):
            logger.log_text(tag, columns=["step", "text"], data=[[step, text]], step=step)
        elif (path := _media_path(logger, tag, step, ".txt")) is not None:
            path.write_text(text)


def log_image(trainer, tag: str, image: np.ndarray, step: int) -> None:
    """image: (3, H, W) uint8."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(tag, [image.transpose(1, 2, 0)], step=step)
        elif (path := _media_path(logger, tag, step, ".png")) is not None:
            path.write_bytes(png_bytes(image))


def log_histogram(trainer, tag: str, values: torch.Tensor, step: int) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(tag, values, step)
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({tag: wandb.Histogram(values.float().numpy()), "trainer/global_step": step})
        elif (path := _media_path(logger, tag, step, ".csv")) is not None:
            path.write_text(histogram_csv(values.float().cpu().numpy()))


def histogram_csv(values: np.ndarray, max_distinct: int = 64) -> str:
    """Each distinct value and its count, or, past max_distinct values, 20 equal bins by their lower edge."""
    distinct, counts = np.unique(values, return_counts=True)
    if len(distinct) <= max_distinct:
        return "value,count\n" + "".join(f"{v:.6g},{n}\n" for v, n in zip(distinct, counts))
    counts, edges = np.histogram(values, bins=20)
    return "bin_start,count\n" + "".join(f"{v:.6g},{n}\n" for v, n in zip(edges[:-1], counts))
