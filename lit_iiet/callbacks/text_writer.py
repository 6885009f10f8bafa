"""Print the texts `predict` generates and append them to a file."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter


class TextPredictionWriter(BasePredictionWriter):
    """Writes each generated text to stdout and to `output` (default: <default_root_dir>/predictions.txt)."""

    def __init__(self, output: str | None = None) -> None:
        """
        Args:
            output: File the texts are appended to; None means predictions.txt under trainer.default_root_dir.
        """
        super().__init__(write_interval="batch")
        self.output = output

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        path = Path(self.output or Path(trainer.default_root_dir) / "predictions.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for text in prediction:
                print(f"----- sample -----\n{text}\n", flush=True)
                f.write(text + "\n\n")
