"""Reading checkpoints safely: weights_only loading and short errors for missing, truncated or foreign files."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from lit_iiet.errors import UserInputError

# Lightning's own names for checkpoints it resolves itself.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def load_checkpoint(path: str | Path) -> dict:
    """torch.load(path, weights_only=True) with one-line errors; the file is only read, never written."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise UserInputError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint (no zip archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"checkpoint {str(path)!r} cannot be read ({first_line[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserInputError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint
