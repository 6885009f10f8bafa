"""Language-modelling data: local text / JSONL files or local `datasets` sources, packed into fixed-length windows."""

from __future__ import annotations

import abc
import glob
import gzip
import io
import itertools
import json
import os
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
import zstandard
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_iiet.data.cache import (
    SPLITS,
    atomic_save,
    ensure_tokenizer,
    load_hf_split,
    stage_splits,
    token_cache_path,
    tokenizer_cache_path,
    trainer_stage,
)
from lit_iiet.data.tokenizer import ENCODING_VERSION, Tokenizer, default_cache_dir
from lit_iiet.errors import UserInputError

# SlimPajama ships as .jsonl.zst and many hub datasets as .parquet: both are read as they are, no unpacking.
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def expand_files(spec: str | list[str] | None, split: str) -> list[Path]:
    """Paths, directories or glob patterns -> the sorted list of text/JSONL files they name."""
    if spec is None:
        return []
    files: list[Path] = []
    for item in [spec] if isinstance(spec, str) else spec:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserInputError(f"{split} data: no file matches {item!r}")
            files += [Path(m) for m in matches if m.endswith(TEXT_SUFFIXES)]
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise UserInputError(f"{split} data: directory {item!r} holds no {'/'.join(TEXT_SUFFIXES)} file")
            files += found
        elif Path(item).is_file():
            if not item.endswith(TEXT_SUFFIXES):
                raise UserInputError(f"{split} data: {item!r} is not one of {', '.join(TEXT_SUFFIXES)}")
            files.append(Path(item))
        else:
            raise UserInputError(f"{split} data file {item!r} does not exist")
    for f in files:
        if f.stat().st_size == 0:
            raise UserInputError(f"{split} data file {str(f)!r} is empty")
    return files


def _not_utf8(path: Path, offset: int) -> UserInputError:
    return UserInputError(f"data file {str(path)!r} is not UTF-8 text (bad byte at offset {offset})")


def open_bytes(path: Path) -> io.BufferedIOBase:
    """A file's bytes, decompressed by its suffix: .gz (gzip), .zst (Zstandard, all frames), else as stored."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # buffered, so that lines can be iterated
    return open(path, "rb")


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """A .txt file is one document; a .jsonl file holds one document per line, in `text_field`; a .parquet file
    one document per row, in its `text_field` column. The one reader of LMDataModule and `prepare`."""
    try:
        if path.name.endswith(".parquet"):
            yield from read_parquet(path, text_field)
            return
        if path.name.endswith((".txt", ".txt.gz")):
            with io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors="strict") as f:
                try:
                    text = f.read()  # decodes the whole file at once, so e.start is the offset in the file
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, e.start) from None
            if not text.strip():
                raise UserInputError(f"data file {str(path)!r} is empty")
            yield text
            return
        # JSONL is decoded line by line from bytes: text-mode iteration decodes in chunks and would report a
        # bad byte's offset inside its chunk instead of inside the file.
        with open_bytes(path) as f:
            offset = 0
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, offset + e.start) from None
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise UserInputError(f"{path}:{n}: no {text_field!r} field (set data.text_field)")
                if not isinstance(record[text_field], str):
                    kind = type(record[text_field]).__name__
                    raise UserInputError(f"{path}:{n}: the {text_field!r} field is a {kind}, not a string")
                yield record[text_field]
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserInputError(f"data file {str(path)!r} is not a readable gzip file ({e})") from None
    except zstandard.ZstdError as e:
        raise UserInputError(f"data file {str(path)!r} is not a readable Zstandard file ({e})") from None


def read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The `text_field` column of a parquet file, row by row, read in record batches (never the whole file)."""
    import pyarrow as pa  # installed with `datasets`; imported here, as only parquet input needs it
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserInputError(f"data file {str(path)!r} is not a readable parquet file ({e})") from None
    schema = table.schema_arrow
    if text_field not in schema.names:
        raise UserInputError(
            f"{path}: no {text_field!r} column (columns: {', '.join(schema.names)}; set data.text_field)"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserInputError(f"{path}: the {text_field!r} column holds {kind}, not strings")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise UserInputError(f"{path}: row {row} has no {text_field!r} value (null)")
            yield text


def encode_document(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of one document followed by <eos>: `Tokenizer.encode_document`, the ids of the whole text."""
    return tokenizer.encode_document(text)


class TextCorpus:
    """Where each split's text comes from: local files, or a local `datasets` source. One place for the data
    module and for `lit_iiet.data.prepare`, which tokenizes the same sources into shards.

    A split's files are found and checked when it is first used, so a run that never reads a split (`predict`
    from a checkpoint in a copy without `data/`) does not need its files."""

    def __init__(
        self,
        train: str | list[str] | None,
        val: str | list[str] | None,
        test: str | list[str] | None,
        text_field: str = "text",
        hf_dataset: str | None = None,
        hf_name: str | None = None,
        hf_splits: dict[str, str] | None = None,
    ) -> None:
        self.text_field, self.hf_dataset, self.hf_name = text_field, hf_dataset, hf_name
        self.hf_splits = {"train": "train", "val": "validation", "test": "test", **(hf_splits or {})}
        self.specs = dict(zip(SPLITS, (train, val, test)))
        self._files: dict[str, list[Path]] = {}

    def files(self, split: str) -> list[Path]:
        """The split's text files, checked (one-line errors for missing or empty ones) on first use."""
        if split not in self._files:
            self._files[split] = expand_files(self.specs[split], split)
        return self._files[split]

    def has_split(self, split: str) -> bool:
        if self.hf_dataset is None:
            return bool(self.files(split))
        saved = Path(self.hf_dataset) / "dataset_dict.json"  # a save_to_disk copy lists its splits
        return not saved.is_file() or self.hf_splits[split] in json.loads(saved.read_text()).get("splits", [])

    def hf_split(self, split: str, streaming: bool = False):
        return load_hf_split(self.hf_dataset, self.hf_name, self.hf_splits[split], streaming)

    def _rows(self, rows, split: str) -> Iterator[str]:
        for row in rows:
            if not isinstance(row.get(self.text_field), str):
                raise UserInputError(
                    f"dataset {self.hf_dataset!r} (split {self.hf_splits[split]!r}): no string column "
                    f"{self.text_field!r} (columns: {', '.join(row)}; set data.text_field)"
                )
            yield row[self.text_field]

    def documents(self, split: str, streaming: bool = False) -> Iterator[str]:
        if self.hf_dataset is not None:
            yield from self._rows(self.hf_split(split, streaming), split)
            return
        for path in self.files(split):
            yield from read_documents(path, self.text_field)

    def training_lines(self) -> Iterator[str]:
        """Non-empty lines of the training text, to train a tokenizer on."""
        for text in self.documents("train", streaming=True):
            for line in text.splitlines():
                if line.strip():
                    yield line

    def source_id(self) -> tuple:
        """What cache keys name the text by: every split's files, with their sizes and times."""
        if self.hf_dataset is not None:
            return (self.hf_dataset, self.hf_name, sorted(self.hf_splits.items()), self.text_field)
        files = tuple(
            (str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
            for split in SPLITS
            for f in self._files_if_readable(split)
        )
        return files + (self.text_field,)

    def describe(self) -> dict:
        """The identity of the text as plain JSON, for `prepare`'s recipe: its files (path, size, mtime) per
        split, or the dataset and its splits, and the text field."""
        if self.hf_dataset is not None:
            return {
                "hf_dataset": self.hf_dataset,
                "hf_name": self.hf_name,
                "hf_splits": self.hf_splits,
                "text_field": self.text_field,
            }
        files = {
            split: [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in fs]
            for split in SPLITS
            if (fs := self.files(split))
        }
        return {**files, "text_field": self.text_field}

    def without_file_lists(self) -> "TextCorpus":
        """A copy that has not expanded its globs: what a prepare worker needs (it reads the one file it is
        given) is then bytes instead of megabytes per job for SlimPajama's 59k files."""
        copy = TextCorpus.__new__(TextCorpus)
        copy.__dict__.update(self.__dict__, _files={})
        return copy

    def _files_if_readable(self, split: str) -> list[Path]:
        # A split that this run does not read may be missing (validate on a machine without the training text):
        # the key then names the text that is there. With every file present it is the key it always was.
        try:
            return self.files(split)
        except UserInputError:
            return []

    # --- units of work for `lit_iiet.data.prepare` ----------------------------------------------------------

    def pieces(self, split: str, rows_per_piece: int = 100_000) -> list[tuple]:
        """A split cut into independently readable pieces, in corpus order: one per file, or contiguous row ranges
        of a `datasets` split. They do not depend on the number of worker processes, so neither do the shards."""
        if self.hf_dataset is None:
            return [("file", str(path)) for path in self.files(split)]
        n = -(-len(self.hf_split(split)) // rows_per_piece)
        return [("rows", i, n) for i in range(n)]

    def piece_documents(self, split: str, piece: tuple) -> Iterator[str]:
        if piece[0] == "file":
            yield from read_documents(Path(piece[1]), self.text_field)
        else:
            _, index, count = piece
            yield from self._rows(self.hf_split(split).shard(count, index, contiguous=True), split)


class PackedDataset(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens from one long token stream (inputs and shifted targets).
    The stream is a tensor held in memory or a `TokenShards` read from disk; both slice to a tensor."""

    def __init__(self, tokens, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise UserInputError(f"split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].long()


class ResumableSampler(DistributedSampler):
    """Shuffles with (seed, epoch) and can start mid-epoch, so a resumed run sees the batches an uninterrupted
    run would have seen. It is a DistributedSampler (one replica without DDP), so Lightning keeps it under DDP
    and calls set_epoch on it; rank r takes positions r, r + world, ... of the epoch's order.

    Up to `block` items the order is DistributedSampler's own permutation. Larger datasets (token shards of a
    whole corpus) are shuffled in blocks: the blocks' order and each block's items are permuted, generated
    lazily, so memory is O(block + n / block) instead of one index per item, and a resume jumps straight to its
    block."""

    BLOCK = 1 << 16  # items per shuffle block: 134M tokens of 2048-token windows, 512 KB of indices

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        skip: int = 0,
        block: int = BLOCK,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = skip  # samples of this rank already consumed in the current epoch
        self.block = block

    def _order(self, start: int) -> Iterator[int]:
        """The epoch's order from global position `start` to the end (total_size: what the ranks share)."""
        n, end = len(self.dataset), self.total_size
        if not self.shuffle:
            yield from range(start, end)
            return
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        if n <= self.block:
            yield from torch.randperm(n, generator=g)[start:end].tolist()
            return
        position = 0
        for b in torch.randperm(-(-n // self.block), generator=g).tolist():
            first, size = b * self.block, min(self.block, n - b * self.block)
            if position + size > start:
                g.manual_seed((self.seed + self.epoch) * 1_000_003 + b)  # each block's own stream: jump to any
                for i in (torch.randperm(size, generator=g) + first)[
                    max(0, start - position) : end - position
                ].tolist():
                    yield i
            position += size
            if position >= end:
                return

    def __iter__(self) -> Iterator[int]:
        # A generator: nothing is drawn before the first item, so the order is that of the epoch set_epoch gave
        # even where the iterator is made first (Lightning does so for a resumed DataLoader(batch_size=None)).
        start, self.skip = self.skip * self.num_replicas, 0  # only the resumed epoch starts late
        yield from itertools.islice(self._order(start), self.rank, None, self.num_replicas)

    @classmethod
    def for_training(cls, trainer, dataset: Dataset, shuffle: bool, batch_size: int, **kwargs) -> "ResumableSampler":
        """The training sampler of this rank, seeded by seed_everything, starting where a resumed run stopped."""
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        # On resume Lightning has restored its loop counters before asking for the loader: skip what the
        # interrupted run already consumed in the current epoch. `processed` includes the batch whose
        # on_train_batch_end saved the checkpoint (`completed` does not count it yet); after the last batch of an
        # epoch (a checkpoint at epoch end, or a reload at the next epoch's start) nothing is left to skip.
        progress = trainer.fit_loop.epoch_loop.batch_progress if trainer else None
        done = 0 if progress is None or progress.is_last_batch else progress.current.processed
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return cls(dataset, world, rank, shuffle, seed, skip=done * batch_size, **kwargs)

    def __len__(self) -> int:
        # The whole epoch, also while skipping: Lightning counts the batches restored from a checkpoint towards
        # the epoch, ends it after len(loader) batches in all, and reuses that length for the later epochs.
        return self.num_samples


class PackedLMData(L.LightningDataModule, abc.ABC):
    """Loaders over packed windows of a token stream per split, shared by LMDataModule (text, tokenized and
    cached in memory) and ShardedLMDataModule (shards written by `lit_iiet.data.prepare`). Subclasses set
    `self.tokenizer` and implement `has_split` and `token_stream`; hparams hold seq_len, batch_size,
    num_workers, shuffle and prompts."""

    tokenizer: Tokenizer | None = None
    shuffle_block = ResumableSampler.BLOCK

    @abc.abstractmethod
    def has_split(self, split: str) -> bool:
        """Whether the split has data."""

    @abc.abstractmethod
    def token_stream(self, split: str):
        """The split's token stream: anything `PackedDataset` slices (a tensor in memory, or `TokenShards`)."""

    def _loader(self, split: str) -> DataLoader:
        if not self.has_split(split):
            raise UserInputError(f"no {split} data configured (set data.{split})")
        h = self.hparams
        kwargs = dict(batch_size=h.batch_size, num_workers=h.num_workers, persistent_workers=h.num_workers > 0)
        dataset = PackedDataset(self.token_stream(split), h.seq_len)
        if split != "train":
            return DataLoader(dataset, shuffle=False, **kwargs)
        sampler = ResumableSampler.for_training(
            self.trainer, dataset, h.shuffle, h.batch_size, block=self.shuffle_block
        )
        return DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        prompts = self.hparams.prompts or [""]
        return DataLoader(prompts, batch_size=1, collate_fn=lambda batch: batch)


class LMDataModule(PackedLMData):
    """Text for language modelling, from local files or a local `datasets` source, with a SentencePiece or
    tokenizer.json tokenizer.

    Every split is tokenized once into memory (and cached on disk): right for corpora up to a few hundred million
    tokens. For larger ones, write shards with `python -m lit_iiet prepare` and use ShardedLMDataModule.
    A stage reads only its splits (fit: train and val; validate: val; test: test; predict: none)."""

    def __init__(
        self,
        train: str | list[str] | None = "data/shakespeare/train.txt.gz",
        val: str | list[str] | None = "data/shakespeare/valid.txt.gz",
        test: str | list[str] | None = "data/shakespeare/test.txt.gz",
        text_field: str = "text",
        hf_dataset: str | None = None,
        hf_name: str | None = None,
        hf_splits: dict[str, str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 2048,
        tokenizer_max_lines: int = 2_000_000,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        shuffle: bool = True,
        cache_dir: str | None = None,
        prompts: list[str] | None = None,
    ) -> None:
        """
        Args:
            train: Training text: .txt(.gz) files (each one document), .jsonl(.gz/.zst) files (one document per
                line), .parquet files (one per row), directories of them, or glob patterns. Ignored when hf_dataset
                is set.
            val: Validation text, same forms as train.
            test: Test text, same forms as train.
            text_field: The JSONL / dataset column holding the text.
            hf_dataset: A local `datasets` source instead of files: a directory written by `save_to_disk`, or a
                dataset name / loading script already in the local `datasets` cache (nothing is downloaded).
            hf_name: The dataset configuration name (e.g. "wikitext-103-raw-v1").
            hf_splits: Our split -> the dataset's split, default {"train": "train", "val": "validation", "test": "test"}.
            tokenizer: A SentencePiece model or Hugging Face tokenizer.json to use (it needs an end-of-text token);
                None trains a BPE model on the training text (cached).
            vocab_size: Vocabulary size of the tokenizer trained when tokenizer is None.
            tokenizer_max_lines: Lines sampled from the training text to train the tokenizer.
            seq_len: Tokens per training window (the model sees seq_len inputs and seq_len shifted targets).
            batch_size: Windows per batch and per device.
            num_workers: DataLoader worker processes.
            shuffle: Shuffle the training windows each epoch (seeded by seed_everything and the epoch).
            cache_dir: Where tokenizers and token ids are cached; default $LIT_IIET_CACHE or ~/.cache/lit_iiet.
            prompts: Prompts that `predict` continues, e.g. ["ROMEO:"].
        """
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 1 or batch_size < 1:
            raise UserInputError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if vocab_size < 260:
            raise UserInputError(f"vocab_size={vocab_size}: at least 260 are needed (256 byte tokens + 4 specials)")
        self.corpus = TextCorpus(train, val, test, text_field, hf_dataset, hf_name, hf_splits)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer: Tokenizer | None = None
        self.tokens: dict[str, torch.Tensor] = {}

    def has_split(self, split: str) -> bool:
        return self.corpus.has_split(split)

    def token_stream(self, split: str) -> torch.Tensor:
        return self.tokens[split]

    # --- tokenizer and token cache -----------------------------------------------------------------------

    def tokenizer_path(self) -> Path:
        h = self.hparams
        if h.tokenizer is not None:
            return Path(h.tokenizer)
        if not self.corpus.has_split("train"):
            raise UserInputError("data.train is empty: give training text, or a tokenizer model with data.tokenizer")
        return tokenizer_cache_path(
            self.cache_dir, "bpe", h.vocab_size, self.corpus.source_id(), h.vocab_size, h.tokenizer_max_lines
        )

    def token_path(self, split: str) -> Path:
        return token_cache_path(
            self.cache_dir, split, self.tokenizer_path(), self.corpus.source_id(), split, ENCODING_VERSION
        )

    def prepare_data(self, splits: tuple[str, ...] | None = None) -> None:
        """Train the tokenizer and tokenize the splits the Trainer's stage reads (default; all outside a Trainer)
        once (rank 0); later runs read the cache."""
        h = self.hparams
        tokenizer = ensure_tokenizer(
            self.tokenizer_path(),
            h.tokenizer is not None,
            self.corpus.training_lines(),
            h.vocab_size,
            h.tokenizer_max_lines,
        )
        for split in stage_splits(trainer_stage(self.trainer)) if splits is None else splits:
            if not self.has_split(split):
                continue
            out = self.token_path(split)
            if out.exists():
                continue
            # int32 per document, not one Python list of ints (28 bytes per token)
            ids = [
                torch.tensor(encode_document(tokenizer, text), dtype=torch.int32)
                for text in self.corpus.documents(split)
            ]
            atomic_save(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32), out)

    def setup(self, stage: str | None = None) -> None:
        self.tokenizer = Tokenizer(self.tokenizer_path())
        splits = stage_splits(stage)
        for split in splits:
            if split in self.tokens or not self.has_split(split):
                continue
            path = self.token_path(split)
            if not path.exists():  # setup() without prepare_data(), e.g. from a notebook
                self.prepare_data(splits)
            self.tokens[split] = torch.load(path, weights_only=True)
