"""Print the texts `predict` generates and write them to a file."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter


def fresh_path(path: Path) -> Path:
    """path, or the first of path-v1, path-v2, ... (before the suffix) that does not exist yet."""
    version = 0
    candidate = path
    while candidate.exists():
        version += 1
        candidate = path.with_name(
            f"{path.name.removesuffix(''.join(path.suffixes))}-v{version}{''.join(path.suffixes)}"
        )
    return candidate


class TextPredictionWriter(BasePredictionWriter):
    """Writes each generated text to stdout and to `output` (default: <default_root_dir>/predictions.txt).

    A model's `predict_step` returns either
    - a list of texts (language-model samples): each is printed under a banner and appended to the file, followed
      by a blank line; or
    - a dict {input position: text} (translations, summaries): the texts are written one per line in input order,
      whatever order the batches come in (each as soon as all earlier ones are written; a newline inside a text
      becomes a space). The file is new for every run: if `output` exists, it goes to output-v1 (-v2, ...) instead,
      so that no line of an earlier run is overwritten or interleaved.
    """

    def __init__(self, output: str | None = None) -> None:
        """
        Args:
            output: File the texts are written to; None means predictions.txt under trainer.default_root_dir.
        """
        super().__init__(write_interval="batch")
        self.output = output
        self._pending: dict[int, str] = {}  # positional outputs that wait for an earlier one
        self._next = 0
        self._aligned: Path | None = None  # this run's file of positional outputs

    def _path(self, trainer) -> Path:
        return Path(self.output or Path(trainer.default_root_dir) / "predictions.txt")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._pending, self._next, self._aligned = {}, 0, None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if isinstance(prediction, dict):
            self._write_in_order(trainer, prediction)
            return
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for text in prediction:
                print(f"----- sample -----\n{text}\n", flush=True)
                f.write(text + "\n\n")

    def _write_in_order(self, trainer, prediction: dict[int, str]) -> None:
        if self._aligned is None:
            self._aligned = fresh_path(self._path(trainer))
            self._aligned.parent.mkdir(parents=True, exist_ok=True)
            self._aligned.touch()
        self._pending.update(prediction)
        lines = []
        while self._next in self._pending:
            lines.append(self._pending.pop(self._next).replace("\r", " ").replace("\n", " "))
            self._next += 1
        if lines:
            with self._aligned.open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
            print("\n".join(lines), flush=True)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._aligned is None:
            return
        if self._pending:  # a gap: an input position that never came back
            raise RuntimeError(
                f"predict: no output for input {self._next}; {len(self._pending)} later outputs were not written"
            )
        print(f"{self._next} outputs, in input order: {self._aligned}", flush=True)
