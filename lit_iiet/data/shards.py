"""Pre-tokenized token shards on disk: the format `lit_iiet.data.prepare` writes and ShardedLMDataModule reads.

A shard folder holds, per split, `.npy` token files (numpy's own format, memory-mapped when read), the tokenizer
that made them as `tokenizer.model` (a SentencePiece model, or tokenizer.json text: `Tokenizer` tells them apart
by content), and `manifest.json`, written last: a folder without it is a prepare that did not finish. Documents follow each other in corpus order, each ended by <eos>, so a split read
from its shards is the token stream that LMDataModule would hold in memory for the same text and tokenizer.

Why not litdata's chunks or torchdata's StatefulDataLoader: see docs/DESIGN.md ("Data at scale").
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from lit_iiet.data.cache import SPLITS
from lit_iiet.data.lm import PackedLMData, ResumableSampler
from lit_iiet.data.tokenizer import ENCODING_VERSION, Tokenizer
from lit_iiet.errors import UserInputError

FORMAT, VERSION = "lit_iiet.token_shards", 1
MANIFEST, TOKENIZER_FILE = "manifest.json", "tokenizer.model"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a finished shard folder, with every file it names checked; one-line errors otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"shard folder {str(folder)!r} does not exist (write it with python -m lit_iiet prepare)")
    path = folder / MANIFEST
    if not path.is_file():
        if not any(folder.iterdir()):
            raise UserInputError(f"shard folder {str(folder)!r} is empty (write it with python -m lit_iiet prepare)")
        raise UserInputError(
            f"shard folder {str(folder)!r} has no {MANIFEST}: its prepare did not finish; run the same prepare command again to resume it"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserInputError(f"{path} is not a {FORMAT} manifest of version {VERSION}")
    if manifest.get("encoding_version") != ENCODING_VERSION:
        raise UserInputError(
            f"shards in {str(folder)!r} were encoded by an older lit_iiet (encoding {manifest.get('encoding_version')}, "
            f"now {ENCODING_VERSION}); prepare them again"
        )
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split, info in manifest["splits"].items():
        for part in info["files"]:
            file = folder / part["path"]
            if not file.is_file():
                raise UserInputError(f"shard file {str(file)!r} named in {MANIFEST} is missing")
            data_bytes = file.stat().st_size - part["offset"]
            if data_bytes != part["tokens"] * itemsize:
                raise UserInputError(
                    f"shard file {str(file)!r} holds {data_bytes} bytes of tokens, {MANIFEST} says "
                    f"{part['tokens'] * itemsize}: the folder was changed after prepare"
                )
    tokenizer = folder / TOKENIZER_FILE
    if not tokenizer.is_file() or file_sha256(tokenizer) != manifest["tokenizer_sha256"]:
        raise UserInputError(f"{tokenizer} is missing or is not the tokenizer that {MANIFEST} names (sha256 differs)")
    return manifest


class TokenShards:
    """One split's token stream across its shard files, memory-mapped; `shards[a:b]` is an int64 tensor.

    Pickles as its file list, so DataLoader workers (fork or spawn) map the files themselves instead of receiving
    copies of them."""

    def __init__(self, files: list[tuple[Path, int, int]], dtype: str) -> None:
        self.files, self.dtype = files, dtype  # (path, header offset, tokens)
        self.starts = np.cumsum([0] + [n for _, _, n in files])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _arrays(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", offset=off, shape=(n,)) for p, off, n in self.files]
        return self._maps

    def __getitem__(self, window: slice) -> torch.Tensor:
        start, stop, _ = window.indices(len(self))
        maps, pieces = self._arrays(), []
        f = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:  # a window may span the end of one file and the start of the next
            end = min(stop, int(self.starts[f + 1]))
            pieces.append(maps[f][start - self.starts[f] : end - self.starts[f]])
            start, f = end, f + 1
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}


class ShardedLMDataModule(PackedLMData):
    """Language-modelling data from token shards written by `python -m lit_iiet prepare`: nothing is
    tokenized or held in memory, the training order resumes exactly mid-epoch, and DDP ranks read disjoint
    windows. Use it for corpora that do not fit in memory (SlimPajama).

    The folder is read and checked when a stage first needs it: `predict` from a checkpoint needs none, and
    takes the tokenizer the checkpoint carries (data.tokenizer)."""

    def __init__(
        self,
        path: str = "shards",
        seq_len: int = 2048,
        batch_size: int = 8,
        num_workers: int = 2,
        shuffle: bool = True,
        shuffle_block: int = ResumableSampler.BLOCK,
        tokenizer: str | None = None,
        prompts: list[str] | None = None,
    ) -> None:
        """
        Args:
            path: The shard folder written by `python -m lit_iiet prepare` (it holds its tokenizer.model).
            seq_len: Tokens per training window (the model sees seq_len inputs and seq_len shifted targets).
            batch_size: Windows per batch and per device.
            num_workers: DataLoader worker processes.
            shuffle: Shuffle the training windows each epoch (seeded by seed_everything and the epoch).
            shuffle_block: Windows shuffled together: the order of the blocks and the windows inside each block
                are permuted, so the sampler's memory does not grow with the corpus.
            tokenizer: A tokenizer expected to be the shards' own (checked, e.g. the one a checkpoint carries;
                predict uses it without reading the folder); None uses the folder's tokenizer.model.
            prompts: Prompts that `predict` continues, e.g. ["ROMEO:"].
        """
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 1 or batch_size < 1 or shuffle_block < 1:
            raise UserInputError(
                f"seq_len={seq_len}, batch_size={batch_size} and shuffle_block={shuffle_block} must be >= 1"
            )
        self.folder = Path(path)
        self.shuffle_block = shuffle_block

    @functools.cached_property
    def manifest(self) -> dict:
        return read_manifest(self.folder)

    def setup(self, stage: str | None = None) -> None:
        given, path = self.hparams.tokenizer, self.hparams.path
        if stage == "predict" and given is not None:
            self.tokenizer = Tokenizer(given)  # prompts need no shards
            return
        self.manifest  # reading it checks the folder, before anything uses the shards
        self.tokenizer = Tokenizer(self.folder / TOKENIZER_FILE)
        # Compared as models, not files: a checkpoint's tokenizer comes back re-serialized (the CLI sets it here).
        if given is not None and Tokenizer(given).model_proto != self.tokenizer.model_proto:
            raise UserInputError(
                f"tokenizer {given!r} is not the one the shards in {path!r} were made with "
                f"({path}/{TOKENIZER_FILE}); prepare the shards with it, or leave data.tokenizer unset"
            )

    def has_split(self, split: str) -> bool:
        return self.manifest["splits"].get(split, {}).get("tokens", 0) > 0

    def token_stream(self, split: str) -> TokenShards:
        files = [(self.folder / p["path"], p["offset"], p["tokens"]) for p in self.manifest["splits"][split]["files"]]
        return TokenShards([f for f in files if f[2] > 0], self.manifest["dtype"])

    def splits(self) -> dict[str, int]:
        """Tokens per split."""
        return {s: self.manifest["splits"][s]["tokens"] for s in SPLITS if s in self.manifest["splits"]}
