"""Reading checkpoints safely: weights_only loading and short errors for missing, truncated or foreign files;
the tokenizer that travels with every checkpoint."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from lit_iiet.data.tokenizer import Tokenizer
from lit_iiet.errors import UserInputError

# Lightning's own names for checkpoints it resolves itself.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
# The run's tokenizer, serialized (`Tokenizer.model_proto`: a SentencePiece protobuf or tokenizer.json text, as
# bytes, which survive weights_only loading); written by ODEModule at every save, absent from older checkpoints.
TOKENIZER_KEY = "tokenizer_model"


def load_checkpoint(path: str | Path, mmap: bool = False, map_location="cpu") -> dict:
    """torch.load(path, weights_only=True) with one-line errors; the file is only read, never written.

    mmap=True maps the tensors instead of reading them: what is never touched (optimizer states) costs no memory.
    map_location: as torch.load's.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise UserInputError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint (no zip archive)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"checkpoint {str(path)!r} cannot be read ({first_line[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserInputError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def stored_tokenizer(checkpoint: dict, source: str | Path) -> bytes | None:
    """The serialized tokenizer a loaded checkpoint carries; None for checkpoints of older versions."""
    proto = checkpoint.get(TOKENIZER_KEY)
    if proto is not None and not isinstance(proto, bytes):
        raise UserInputError(
            f"checkpoint {str(source)!r}: {TOKENIZER_KEY!r} is a {type(proto).__name__}, not a serialized tokenizer"
        )
    return proto


def checkpoint_tokenizer(
    checkpoint: dict,
    source: str | Path,
    given: str | Path | Tokenizer | None = None,
    option: str = "data.tokenizer",
    cache_dir: str | Path | None = None,
) -> Tokenizer | None:
    """The tokenizer to use with a loaded checkpoint: the one it carries (restored under cache_dir, see
    `Tokenizer.from_model_proto`), or `given`, which must then be the same model. A checkpoint that carries none
    (saved before tokenizers travelled with checkpoints) leaves `given`, None included. `option` names `given`
    in the error."""
    proto = stored_tokenizer(checkpoint, source)
    tokenizer = given if isinstance(given, Tokenizer) or given is None else Tokenizer(given)
    if proto is None:
        return tokenizer
    if tokenizer is None:
        return Tokenizer.from_model_proto(proto, cache_dir)
    if tokenizer.model_proto != proto:
        raise UserInputError(
            f"{option} {str(tokenizer.path)!r} is not the tokenizer stored in checkpoint {str(source)!r}; "
            f"leave {option} unset to use the checkpoint's"
        )
    return tokenizer
