"""What both data modules share: the offline `datasets` loader, the tokenizer and token-id caches, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from lit_iiet.data.tokenizer import TOKENIZER_VERSION, Tokenizer, fingerprint
from lit_iiet.errors import UserInputError

SPLITS = ("train", "val", "test")
# The splits each Lightning stage reads. Data modules check and tokenize only these, so that `predict` (which
# continues prompts) needs no corpus and `validate` no training text; no stage (setup() by hand) reads all.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


def stage_splits(stage: str | None) -> tuple[str, ...]:
    return STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS


def trainer_stage(trainer) -> str | None:
    """The stage a Trainer runs ("fit", "validate", ...), for prepare_data(), which Lightning calls without one."""
    fn = trainer.state.fn if trainer is not None else None
    return fn.value if fn is not None else None


def load_hf_split(source: str, name: str | None, split: str, streaming: bool = False):
    """A split of a local `datasets` source: a `save_to_disk` folder, or a dataset already in the local cache.
    Nothing is downloaded; a source that is not there is a one-line error saying how to provide it."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the hub at run time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    try:
        if Path(source).is_dir() and (Path(source) / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(source)[split]
            return ds.to_iterable_dataset() if streaming else ds
        return datasets.load_dataset(source, name, split=split, streaming=streaming)
    except (FileNotFoundError, ConnectionError, ValueError, KeyError) as e:
        raise UserInputError(
            f"dataset {source!r} (config {name!r}, split {split!r}) is not available locally: "
            f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}. Save it once with "
            "`datasets.load_dataset(...).save_to_disk(DIR)` on a connected machine and set data.hf_dataset=DIR, "
            "or point data.train/val/test at local files."
        ) from None


def tokenizer_cache_path(cache_dir: Path, kind: str, vocab_size: int, *key: object) -> Path:
    """Where a tokenizer trained on some text is cached: named by the training options and the text's identity."""
    return cache_dir / "tokenizers" / f"{kind}{vocab_size}-{fingerprint(TOKENIZER_VERSION, *key)}.model"


def token_cache_path(cache_dir: Path, name: str, tokenizer: Path, source_id: tuple, *key: object) -> Path:
    """Where token ids are cached: named by the text, the tokenizer file (path and stamp) and the options."""
    stamp = (tokenizer.stat().st_size, tokenizer.stat().st_mtime_ns) if tokenizer.exists() else None
    return cache_dir / "tokens" / f"{name}-{fingerprint(source_id, str(tokenizer.resolve()), stamp, *key)}.pt"


def ensure_tokenizer(
    path: Path, given: bool, lines: Iterator[str], vocab_size: int, max_lines: int = 2_000_000
) -> Tokenizer:
    """The tokenizer at path: a given model must exist; a cached one is trained on `lines` the first time."""
    if not path.exists():
        if given:
            raise UserInputError(f"tokenizer model {str(path)!r} does not exist")
        Tokenizer.train(lines, path, vocab_size, max_lines)
    return Tokenizer(path)


def atomic_save(obj, path: Path) -> None:
    """torch.save under a temporary name, then rename: a crash never leaves a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)
