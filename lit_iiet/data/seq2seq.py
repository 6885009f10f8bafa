"""Sequence-to-sequence data: translation and summarization pairs with a joint SentencePiece vocabulary."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_iiet.data.cache import (
    SPLITS,
    atomic_save,
    ensure_tokenizer,
    load_hf_split,
    token_cache_path,
    tokenizer_cache_path,
)
from lit_iiet.data.lm import ResumableSampler
from lit_iiet.data.tokenizer import Tokenizer, default_cache_dir
from lit_iiet.errors import UserInputError

PREDICT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
# Version of the token files of pairs, part of their cache key: 2 added the cleaning counts.
PAIR_CACHE_VERSION = 2
# ISO 639-1: the language codes a translation data module accepts.
LANGUAGES = set(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee el "
    "en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu "
    "ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na "
    "nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so "
    "sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu".split()
)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def get_field(row: dict, field: str):
    """row["a"]["b"] for field "a.b"; WMT-style rows keep their languages under "translation"."""
    value = row
    for part in field.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, dict) and isinstance(value.get("translation"), dict) and part in value["translation"]:
            value = value["translation"][part]
        else:
            return None
    return value


class PairDataset(Dataset):
    """Token ids of (source, target) pairs, kept flat with offsets (one tensor each, cheap to cache)."""

    def __init__(self, encoded: dict[str, torch.Tensor]) -> None:
        self.src, self.src_off = encoded["src"], encoded["src_offsets"]
        self.tgt, self.tgt_off = encoded["tgt"], encoded["tgt_offsets"]

    def __len__(self) -> int:
        return len(self.src_off) - 1

    def __getitem__(self, i: int):
        return (
            i,
            self.src[self.src_off[i] : self.src_off[i + 1]].long(),
            self.tgt[self.tgt_off[i] : self.tgt_off[i + 1]].long(),
        )

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Padded row lengths of every pair in a batch: the source (with eos), the target + 1 (bos / eos)."""
        return self.src_off.diff().numpy(), self.tgt_off.diff().numpy() + 1


def token_batches(
    src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int, seed: int | None = None
) -> list[np.ndarray]:
    """Pair indices cut into batches of similar lengths whose padded tensors hold at most max_tokens each.

    The pairs are ordered by source length, then by target length (fewer pads than ordering by the longer side:
    6% -> 3% on the Bible pairs), ties in a random order drawn from `seed` (index order when seed is None), and
    cut greedily: a batch takes the next pair while rows x longest source and rows x longest target both stay
    <= max_tokens. A single pair longer than max_tokens gets a batch alone. fairseq's batch_by_size follows the
    same idea.

    Args:
        src_lens: Source row length of each pair.
        tgt_lens: Target row length of each pair (target + 1 for bos / eos).
        max_tokens: Budget of each padded tensor (source and target), rows x longest row.
        seed: Seed of the tie-break among pairs of equal lengths; None keeps index order.
    """
    src, tgt = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
    tie = np.arange(len(src)) if seed is None else np.random.default_rng(seed).permutation(len(src))
    order = np.lexsort((tie, tgt, src))  # the last key sorts first
    batches, start, longest = [], 0, 0
    for pos, row in enumerate(np.maximum(src, tgt)[order].tolist()):  # rows x max(S, T) <= budget <=> both fit
        if pos > start and (pos - start + 1) * max(longest, row) > max_tokens:
            batches.append(order[start:pos])
            start, longest = pos, 0
        longest = max(longest, row)
    if len(order):
        batches.append(order[start:])
    return batches


def split_to_divide(batches: list[np.ndarray], parts: int) -> list[np.ndarray]:
    """Split batches with the most rows in halves (which still fit the budget) until `parts` divides their number,
    so that every rank gets as many batches and none is dropped."""
    batches = list(batches)
    while len(batches) % parts:
        k = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[k]) < 2:
            break  # fewer pairs than ranks; the sampler drops the remainder
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


class BatchedPairs(Dataset):
    """Item i is batch i of a list of pair-index batches, collated.

    A DataLoader(batch_size=None) yields these whole batches, and a sampler over them deals whole batches: the
    training ResumableSampler shuffles their order per epoch, gives each DDP rank its own batches and skips
    those a resumed run already trained, exactly as it does for single pairs.
    """

    def __init__(self, pairs: PairDataset, batches: list[np.ndarray], collate: Callable) -> None:
        self.pairs, self.batches, self.collate = pairs, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.collate([self.pairs[j] for j in self.batches[i].tolist()])


def clean_pairs(
    src_lens: Sequence[int],
    tgt_lens: Sequence[int],
    empty: Sequence[bool],
    drop_empty: bool,
    max_len: int | None,
    max_ratio: float | None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Which pairs fairseq-style cleaning keeps (a boolean mask), and how many it dropped for each reason.

    As fairseq's WMT recipe (clean-corpus-n.perl after BPE): a pair is dropped when a side is empty, when a side
    has more than max_len tokens, or when one side has more than max_ratio times the tokens of the other. Each
    dropped pair is counted once, under the first of these reasons (empty, long, ratio) that applies. A pair with
    an empty side that is kept (drop_empty False) is not length- or ratio-checked: it has no ratio.

    Args:
        src_lens: Source tokens of each pair (without eos).
        tgt_lens: Target tokens of each pair (without bos / eos).
        empty: Whether each pair has an empty (or whitespace-only) side.
        drop_empty: Drop the pairs with an empty side.
        max_len: Drop pairs with a side longer than this; None: any length.
        max_ratio: Drop pairs whose longer side has more than max_ratio x the tokens of the shorter; None: any.
    """
    src, tgt = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
    empty = np.asarray(empty, dtype=bool)
    longer, shorter = np.maximum(src, tgt), np.minimum(src, tgt)
    none = np.zeros(len(empty), dtype=bool)
    dropped = {"empty": empty if drop_empty else none}
    undecided = ~empty
    dropped["long"] = undecided & (longer > max_len) if max_len is not None else none
    undecided &= ~dropped["long"]
    # longer > ratio x shorter: the perl script's two divisions in one, with no division by zero.
    dropped["ratio"] = undecided & (longer > max_ratio * shorter) if max_ratio is not None else none
    keep = ~(dropped["empty"] | dropped["long"] | dropped["ratio"])
    return keep, {reason: int(mask.sum()) for reason, mask in dropped.items()}


def pack(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0] + [len(s) for s in sequences]).cumsum(0)
    return torch.tensor([t for s in sequences for t in s], dtype=torch.int32), offsets


# --- sources to decode: one place for the data module's predict loader and Seq2SeqModel.generate_text ----------


def encode_sources(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    max_src_len: int,
    long_source: str,
    split: str,
    item: str = "pair",
    option: str = "data.long_source",
) -> list[list[int]]:
    """Source ids + eos, at most max_src_len of them. Longer sources are truncated (counted in a warning) or, with
    long_source="reject", an error naming the first ("{split} {item} {index}") and the `option` that allows them."""
    return fit_sources(
        tokenizer.encode_batch(list(texts)), tokenizer.eos_id, max_src_len, long_source, split, item, option
    )


def fit_sources(
    ids: list[list[int]],
    eos_id: int,
    max_src_len: int,
    long_source: str,
    split: str,
    item: str = "pair",
    option: str = "data.long_source",
) -> list[list[int]]:
    """`encode_sources` on sources already tokenized (the training pairs are tokenized once, for cleaning too)."""
    if long_source not in ("truncate", "reject"):
        raise UserInputError(f"long_source={long_source!r}; choose 'truncate' or 'reject'")
    long = [i for i, s in enumerate(ids) if len(s) + 1 > max_src_len]
    if long and long_source == "reject":
        raise UserInputError(
            f"{split} {item} {long[0]} has a source of {len(ids[long[0]]) + 1} tokens, more than max_src_len={max_src_len} "
            f"({len(long)} such {item}s; set {option}=truncate to cut them)"
        )
    if long:
        rank_zero_warn(
            f"{len(long)} of {len(ids)} {split} sources are longer than max_src_len={max_src_len} tokens and were truncated"
        )
    return [s[: max_src_len - 1] + [eos_id] for s in ids]


def source_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Source indices in batches of similar length (fewest pads for beam search): max_tokens per padded source
    tensor as `token_batches` cuts them, or else batch_size sources in order of length."""
    if max_tokens is not None:
        return token_batches(lengths, lengths, max_tokens)
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate_sources(indices: Sequence[int], sources: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sources: index (their positions in the input), src (B, S) and src_mask."""
    rows = [sources[i] for i in indices]
    src = torch.full((len(rows), max(len(s) for s in rows)), pad_id, dtype=torch.long)
    for b, s in enumerate(rows):
        src[b, : len(s)] = torch.as_tensor(s)
    return {"index": torch.as_tensor(list(indices), dtype=torch.long), "src": src, "src_mask": src != pad_id}


class SourceBatches(Dataset):
    """Item i is batch i of `source_batches`, collated."""

    def __init__(self, sources: list[list[int]], batches: list[np.ndarray], pad_id: int) -> None:
        self.sources, self.batches, self.pad_id = sources, batches, pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate_sources(self.batches[i].tolist(), self.sources, self.pad_id)


def _only_item(items: list):
    """collate_fn of a batch_size=1 loader whose items are whole batches. (With batch_size=None, Lightning's predict
    loop warns that it cannot track batch indices.)"""
    return items[0]


def read_sources(path: Path, field: str) -> list[str]:
    """The sources of a predict file: a .txt(.gz) file holds one per line, a .jsonl(.gz) file one object per line
    with the source in `field` (dotted for nested objects)."""
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    sources: list[str] = []
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not jsonl:
                    if not line.strip():
                        raise UserInputError(f"{path}:{n}: empty line; every line of a .txt predict file is one source")
                    sources.append(line)
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                text = get_field(row, field) if isinstance(row, dict) else None
                if not isinstance(text, str) or not text.strip():
                    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise UserInputError(f"{path}:{n}: no source text in field {field!r} (fields: {keys})")
                sources.append(text)
    except UnicodeDecodeError:
        raise UserInputError(f"predict data file {str(path)!r} is not UTF-8 text") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserInputError(f"predict data file {str(path)!r} is not a readable gzip file ({e})") from None
    if not sources:
        raise UserInputError(f"predict data file {str(path)!r} holds no sources")
    return sources


@dataclass(frozen=True)
class Seq2SeqData:
    """What a set-up seq2seq data module tells the model it feeds, once per run (`Seq2SeqModel.connect`)."""

    task: Literal["translation", "summarization"]
    """Which scores validation and test report: BLEU / chrF for translation, ROUGE for summarization."""
    tokenizer: Tokenizer
    """The tokenizer of the batches (pad, bos, eos ids) and of the decoded text."""
    max_src_len: int
    """Longest source of a batch, in tokens (data.max_src_len)."""
    max_tgt_len: int
    """Longest target row of a batch, in tokens (data.max_tgt_len)."""
    texts: Mapping[str, Sequence[tuple[str, str]]]
    """(source, target) texts of the val and test pairs, by split, indexed like the batches' "index"."""
    predict_sources: int
    """How many sources `predict` decodes (0 in the other stages)."""

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id


class Seq2SeqDataModule(L.LightningDataModule):
    """Pairs from JSONL files or a local `datasets` source; batches of right-padded sources and targets."""

    task = "translation"

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        src_field: str = "source",
        tgt_field: str = "target",
        hf_dataset: str | None = None,
        hf_name: str | None = None,
        hf_splits: dict[str, str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 8000,
        max_src_len: int = 256,
        max_tgt_len: int = 256,
        long_source: Literal["truncate", "reject"] = "truncate",
        drop_empty: bool = True,
        drop_longer_than: int | None = None,
        drop_ratio_above: float | None = None,
        batch_size: int = 32,
        max_tokens: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            train: Training pairs: a .jsonl(.gz) file of objects holding src_field and tgt_field. (Translation
                also takes a prefix P of parallel text files P.<src_lang> and P.<tgt_lang>.)
            val: Validation pairs, same forms as train.
            test: Test pairs, same forms as train.
            predict: Sources that `predict` translates or summarizes: a .txt(.gz) file with one source per line, or a
                .jsonl(.gz) file with the source of each line in src_field. The outputs come in input order.
            src_field: Source field; dotted for nested objects ("translation.de").
            tgt_field: Target field.
            hf_dataset: A local `datasets` source instead of files: a `save_to_disk` directory, or a dataset
                already in the local `datasets` cache (nothing is downloaded).
            hf_name: The dataset configuration (e.g. "de-en" for wmt14, "3.0.0" for cnn_dailymail).
            hf_splits: Our split -> the dataset's split; default train/validation/test.
            tokenizer: A SentencePiece model to use; None trains a joint BPE vocabulary on both sides of train.
            vocab_size: Size of the joint vocabulary trained when tokenizer is None.
            max_src_len: Longest source in tokens (with eos); longer ones are handled by long_source.
            max_tgt_len: Longest target in tokens (with bos or eos); longer targets are truncated.
            long_source: "truncate" (counted in a warning) or "reject" (an error naming the first such pair).
            drop_empty: Drop training pairs whose source or target is empty or only whitespace. False keeps them
                (an empty side trains as a lone eos). Validation and test pairs are never dropped, as in fairseq,
                which cleans the training data only: an empty one is kept, counted in a message, and scored, so
                that scores cover the whole test set and test outputs stay line by line with its input.
            drop_longer_than: Drop training pairs with a source or target of more than this many tokens of the
                joint vocabulary (counted without bos / eos, as fairseq counts BPE tokens); the WMT'14 configs
                use fairseq's 250. None keeps every length (sources over max_src_len are then handled by
                long_source, targets over max_tgt_len truncated). Applied before that truncation.
            drop_ratio_above: Drop training pairs whose longer side has more than this many times the tokens of
                the shorter side (a likely misalignment); the WMT'14 configs use fairseq's 1.5. None: no ratio
                filter (summarization, where documents are much longer than their summaries). How many
                pairs each option drops is printed once per run for the training split.
            batch_size: Pairs per batch and per device (unused when max_tokens is set).
            max_tokens: Batches by token budget instead of batch_size: pairs of similar length batched together so
                that rows x longest source and rows x longest target (with bos / eos) stay <= max_tokens per
                device. Training shuffles the order of these batches each epoch; val / test take them in a
                fixed shuffled order. None: batch_size pairs drawn at random.
            num_workers: DataLoader worker processes.
            shuffle: Shuffle the training pairs (with max_tokens: the batches) each epoch (seeded).
            cache_dir: Where tokenizers and token ids are cached; default $LIT_IIET_CACHE or ~/.cache/lit_iiet.
        """
        super().__init__()
        self.save_hyperparameters()
        self.src_field, self.tgt_field = src_field, tgt_field  # subclasses resolve defaults before calling us
        if long_source not in ("truncate", "reject"):
            raise UserInputError(f"long_source={long_source!r}; choose 'truncate' or 'reject'")
        if max_src_len < 2 or max_tgt_len < 2 or batch_size < 1:
            raise UserInputError(
                f"max_src_len={max_src_len}, max_tgt_len={max_tgt_len} must be >= 2 and batch_size={batch_size} >= 1"
            )
        if drop_longer_than is not None and drop_longer_than < 1:
            raise UserInputError(
                f"drop_longer_than={drop_longer_than}: give a number of tokens >= 1, or null to keep every length"
            )
        if drop_ratio_above is not None and not drop_ratio_above >= 1:  # `not >=` also rejects nan
            raise UserInputError(
                f"drop_ratio_above={drop_ratio_above}: give a length ratio >= 1 (fairseq's WMT recipe uses 1.5), "
                "or null for no ratio filter"
            )
        if vocab_size < 260:
            raise UserInputError(f"vocab_size={vocab_size}: at least 260 are needed (256 byte tokens + 4 specials)")
        # Sources hold at most max_src_len tokens, target rows max_tgt_len (<bos> + max_tgt_len - 1 tokens).
        if max_tokens is not None and max_tokens < max(max_src_len, max_tgt_len):
            raise UserInputError(
                f"max_tokens={max_tokens} is smaller than the longest allowed pair (max_src_len={max_src_len}, "
                f"max_tgt_len={max_tgt_len}); set it to at least {max(max_src_len, max_tgt_len)}"
            )
        self.specs = {"train": train, "val": val, "test": test}
        self.predict_file = self._predict_file(predict) if predict is not None else None
        # The split files are checked when a stage reads them: predict (data.predict's sources) needs none.
        if hf_dataset is None and train is None and tokenizer is None:
            raise UserInputError("data.train is not set: give training pairs, or a tokenizer model with data.tokenizer")
        self.hf_splits = {"train": "train", "val": "validation", "test": "test", **(hf_splits or {})}
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer: Tokenizer | None = None
        self.predict_sources: list[list[int]] = []  # token ids of the predict file, in its order (setup("predict"))
        self.datasets: dict[str, PairDataset] = {}
        self.texts: dict[str, list[tuple[str, str]]] = {}

    # --- sources ------------------------------------------------------------------------------------------

    def _files(self, split: str, spec: str) -> list[Path]:
        path = Path(spec)
        if spec.endswith((".jsonl", ".jsonl.gz")):
            files = [path]
        else:
            raise UserInputError(f"{split} data {spec!r}: expected a .jsonl or .jsonl.gz file")
        for f in files:
            if not f.is_file():
                raise UserInputError(f"{split} data file {str(f)!r} does not exist")
            if f.stat().st_size == 0:
                raise UserInputError(f"{split} data file {str(f)!r} is empty")
        return files

    def _predict_file(self, spec: str) -> Path:
        path = Path(spec)
        if not spec.endswith(PREDICT_SUFFIXES):
            raise UserInputError(f"predict data {spec!r}: expected one of {', '.join(PREDICT_SUFFIXES)}")
        if not path.is_file():
            raise UserInputError(f"predict data file {spec!r} does not exist")
        if path.stat().st_size == 0:
            raise UserInputError(f"predict data file {spec!r} is empty")
        return path

    def _hf_rows(self, split: str) -> Iterator[dict]:
        yield from load_hf_split(self.hparams.hf_dataset, self.hparams.hf_name, self.hf_splits[split])

    def _rows(self, split: str) -> Iterator[tuple[str, dict]]:
        """(where, row) for each pair of a split; where names the file and line for error messages."""
        if self.hparams.hf_dataset is not None:
            for n, row in enumerate(self._hf_rows(split)):
                yield f"{self.hparams.hf_dataset}[{self.hf_splits[split]}][{n}]", row
            return
        for path in self._files(split, self.specs[split]):
            with _open_text(path) as f:
                try:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                yield f"{path}:{n}", json.loads(line)
                            except json.JSONDecodeError as e:
                                raise UserInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                except UnicodeDecodeError:
                    raise UserInputError(f"data file {str(path)!r} is not UTF-8 text") from None

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """The (source, target) texts of a split, in file order. A missing field is an error; an empty side is not
        (real corpora have a few; `encode_pairs` drops them from the training split)."""
        out = []
        for where, row in self._rows(split):
            src, tgt = get_field(row, self.src_field), get_field(row, self.tgt_field)
            for side, field, text in (("source", self.src_field, src), ("target", self.tgt_field, tgt)):
                if not isinstance(text, str):
                    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise UserInputError(f"{where}: no {side} text in field {field!r} (fields: {keys})")
            out.append((src, tgt))
        if not out:
            raise UserInputError(f"{split} data holds no pairs")
        return out

    def has_split(self, split: str) -> bool:
        return self.hparams.hf_dataset is not None or self.specs[split] is not None

    def _source_id(self) -> tuple:
        h = self.hparams
        if h.hf_dataset is not None:
            return (h.hf_dataset, h.hf_name, sorted(self.hf_splits.items()), self.src_field, self.tgt_field)
        stats = tuple(
            (str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
            for split, spec in self.specs.items()
            if spec is not None
            for f in self._files(split, spec)
        )
        return stats + (self.src_field, self.tgt_field)

    # --- tokenizer and cache -------------------------------------------------------------------------------

    def tokenizer_path(self) -> Path:
        if self.hparams.tokenizer is not None:
            return Path(self.hparams.tokenizer)
        return tokenizer_cache_path(
            self.cache_dir, "joint", self.hparams.vocab_size, "joint", self._source_id(), self.hparams.vocab_size
        )

    def token_path(self, split: str) -> Path:
        h = self.hparams
        # Only the training split is cleaned, so only its ids depend on the cleaning options.
        cleaning = (h.drop_empty, h.drop_longer_than, h.drop_ratio_above) if split == "train" else ()
        return token_cache_path(
            self.cache_dir,
            f"pairs-{split}",
            self.tokenizer_path(),
            self._source_id(),
            h.max_src_len,
            h.max_tgt_len,
            h.long_source,
            split,
            PAIR_CACHE_VERSION,
            *cleaning,
        )

    def _training_lines(self) -> Iterator[str]:
        for src, tgt in self.pairs("train"):
            for text in (src, tgt):
                for line in text.splitlines():
                    if line.strip():
                        yield line[:4000]  # SentencePiece skips longer training lines anyway

    def encode_pairs(self, split: str, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
        """Token ids of a split's pairs, and `counts`: pairs read, pairs with an empty side, then those dropped as
        empty, too long and by length ratio (always 0 outside the training split, which alone is cleaned)."""
        h = self.hparams
        pairs = self.pairs(split)
        src_ids = tokenizer.encode_batch([s for s, _ in pairs])
        tgt_ids = tokenizer.encode_batch([t for _, t in pairs])
        empty = [not s.strip() or not t.strip() for s, t in pairs]
        dropped = {"empty": 0, "long": 0, "ratio": 0}
        if split == "train":
            keep, dropped = clean_pairs(
                [len(s) for s in src_ids],
                [len(t) for t in tgt_ids],
                empty,
                h.drop_empty,
                h.drop_longer_than,
                h.drop_ratio_above,
            )
            if not keep.any():
                raise UserInputError(
                    f"train data: cleaning dropped all {len(pairs):,} pairs ({self._dropped_text(dropped)}); "
                    "check data.drop_empty, data.drop_longer_than and data.drop_ratio_above"
                )
            src_ids = [s for s, k in zip(src_ids, keep) if k]
            tgt_ids = [t for t, k in zip(tgt_ids, keep) if k]
        counts = [len(pairs), sum(empty), dropped["empty"], dropped["long"], dropped["ratio"]]
        srcs = fit_sources(src_ids, tokenizer.eos_id, h.max_src_len, h.long_source, split)
        tgts = [t[: h.max_tgt_len - 1] for t in tgt_ids]
        (src, src_off), (tgt, tgt_off) = pack(srcs), pack(tgts)
        return {
            "src": src,
            "src_offsets": src_off,
            "tgt": tgt,
            "tgt_offsets": tgt_off,
            "counts": torch.tensor(counts, dtype=torch.int64),
        }

    def _dropped_text(self, dropped: dict[str, int]) -> str:
        """ "dropped 12 empty, 3,021 over 250 tokens, ..." for the filters that are on."""
        h = self.hparams
        parts = [f"{dropped['empty']:,} empty"] if h.drop_empty else []
        if h.drop_longer_than is not None:
            parts.append(f"{dropped['long']:,} over {h.drop_longer_than:,} tokens")
        if h.drop_ratio_above is not None:
            parts.append(f"{dropped['ratio']:,} with length ratio > {h.drop_ratio_above:g}")
        return "dropped " + ", ".join(parts)

    def report_cleaning(self, split: str, counts: list[int]) -> None:
        """One line per split on rank zero: what cleaning dropped from train, or how many empty pairs were kept."""
        total, empty, *dropped = counts
        h = self.hparams
        if split == "train" and (h.drop_empty or h.drop_longer_than is not None or h.drop_ratio_above is not None):
            text = self._dropped_text(dict(zip(("empty", "long", "ratio"), dropped)))
            rank_zero_info(f"train: kept {total - sum(dropped):,} of {total:,} pairs ({text})")
        if empty > dropped[0]:
            why = (
                "data.drop_empty is false" if split == "train" else "only train is cleaned, so scores cover every pair"
            )
            rank_zero_info(f"{split}: {empty - dropped[0]:,} of {total:,} pairs have an empty side; kept ({why})")

    def prepare_data(self) -> None:
        tokenizer = ensure_tokenizer(
            self.tokenizer_path(), self.hparams.tokenizer is not None, self._training_lines(), self.hparams.vocab_size
        )
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING:
            return  # predict reads its own sources in setup; the pairs need no token ids
        for split in SPLITS:
            out = self.token_path(split)
            if not self.has_split(split) or out.exists():
                continue
            atomic_save(self.encode_pairs(split, tokenizer), out)

    def setup(self, stage: str | None = None) -> None:
        self.tokenizer = Tokenizer(self.tokenizer_path())
        tok = self.tokenizer
        if len({tok.pad_id, tok.bos_id, tok.eos_id}) < 3:  # a tokenizer.json may lack <pad> or <bos>
            raise UserInputError(
                f"tokenizer {str(tok.path)!r} has no distinct <pad>, <bos> and <eos>, which pad, start and end targets"
            )
        if stage == "predict":
            if self.predict_file is None:
                raise UserInputError(
                    "no predict data configured (set data.predict to a .txt or .jsonl file of sources)"
                )
            sources = read_sources(self.predict_file, self.src_field)
            h = self.hparams
            self.predict_sources = encode_sources(
                sources, self.tokenizer, h.max_src_len, h.long_source, "predict", "source"
            )
            return
        for split in SPLITS:
            if split in self.datasets or not self.has_split(split):
                continue
            if not self.token_path(split).exists():
                self.prepare_data()
            encoded = torch.load(self.token_path(split), weights_only=True)
            self.report_cleaning(split, encoded["counts"].tolist())
            self.datasets[split] = PairDataset(encoded)
            if split != "train":  # references are scored on the original text
                self.texts[split] = self.pairs(split)

    def for_model(self) -> Seq2SeqData:
        """What the model needs to know about this data, once `setup` has run (`Seq2SeqModel.connect` takes it)."""
        h = self.hparams
        return Seq2SeqData(
            self.task, self.tokenizer, h.max_src_len, h.max_tgt_len, dict(self.texts), len(self.predict_sources)
        )

    # --- loaders -------------------------------------------------------------------------------------------

    def collate(self, items) -> dict[str, torch.Tensor]:
        """Right-padded batch: src (B, S) + src_mask, tgt_in = <bos> target, tgt_out = target <eos>."""
        tok, B = self.tokenizer, len(items)
        S = max(len(s) for _, s, _ in items)
        T = max(len(t) for _, _, t in items) + 1
        src = torch.full((B, S), tok.pad_id, dtype=torch.long)
        tgt_in = torch.full((B, T), tok.pad_id, dtype=torch.long)
        tgt_out = torch.full((B, T), tok.pad_id, dtype=torch.long)
        for b, (_, s, t) in enumerate(items):
            src[b, : len(s)] = s
            tgt_in[b, 0], tgt_in[b, 1 : len(t) + 1] = tok.bos_id, t
            tgt_out[b, : len(t)], tgt_out[b, len(t)] = t, tok.eos_id
        index = torch.tensor([i for i, _, _ in items])
        return {"index": index, "src": src, "src_mask": src != tok.pad_id, "tgt_in": tgt_in, "tgt_out": tgt_out}

    def _loader(self, split: str) -> DataLoader:
        if not self.has_split(split):
            raise UserInputError(f"no {split} data configured (set data.{split})")
        dataset = self.datasets[split]
        if self.hparams.max_tokens is not None:
            return self._token_loader(split, dataset)
        kwargs = dict(
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.hparams.num_workers > 0,
        )
        if split != "train":
            return DataLoader(dataset, shuffle=False, **kwargs)
        sampler = ResumableSampler.for_training(self.trainer, dataset, self.hparams.shuffle, self.hparams.batch_size)
        return DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)

    def _token_loader(self, split: str, dataset: PairDataset) -> DataLoader:
        """Length-bucketed batches of at most max_tokens per padded tensor, every pair once per epoch."""
        h = self.hparams
        kwargs = dict(batch_size=None, num_workers=h.num_workers, persistent_workers=h.num_workers > 0)
        if split != "train":
            # Fewest pads for the loss and beam search. The batches come in a fixed shuffled order so that
            # model.val_decode_batches decodes a spread of lengths, not only the shortest pairs; the model keys its
            # outputs by batch["index"], so test outputs stay in input order.
            batches = token_batches(*dataset.lengths(), h.max_tokens)
            batches = [batches[k] for k in np.random.default_rng(0).permutation(len(batches))]
            return DataLoader(BatchedPairs(dataset, batches, self.collate), shuffle=False, **kwargs)
        # The batches are fixed for the run (the same on every rank and after a resume: same seed, same world
        # size); each item of the dataset is a whole batch, so the training sampler shuffles batches per
        # (seed, epoch), deals disjoint batches to the ranks and skips those a resumed run already trained.
        world = self.trainer.world_size if self.trainer else 1
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's, as the sampler's
        batches = split_to_divide(token_batches(*dataset.lengths(), h.max_tokens, seed), world)
        plan = BatchedPairs(dataset, batches, self.collate)
        sampler = ResumableSampler.for_training(self.trainer, plan, h.shuffle, batch_size=1)
        return DataLoader(plan, sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The predict sources in batches of similar length (batch_size sources, or max_tokens); each batch carries
        the sources' input positions, by which the outputs are put back in input order."""
        if self.trainer is not None and self.trainer.world_size > 1:
            raise UserInputError(f"predict runs on one device (trainer.devices=1), not {self.trainer.world_size}")
        h = self.hparams
        batches = source_batches([len(s) for s in self.predict_sources], h.batch_size, h.max_tokens)
        return DataLoader(
            SourceBatches(self.predict_sources, batches, self.tokenizer.pad_id),
            batch_size=1,
            collate_fn=_only_item,
            num_workers=h.num_workers,
        )


class TranslationDataModule(Seq2SeqDataModule):
    """Translation from src_lang to tgt_lang: JSONL pairs, parallel text files, or WMT from a local `datasets` copy."""

    task = "translation"

    def __init__(
        self,
        src_lang: str = "fr",
        tgt_lang: str = "en",
        train: str | None = "data/bible/fr-en.train.jsonl.gz",
        val: str | None = "data/bible/fr-en.valid.jsonl.gz",
        test: str | None = "data/bible/fr-en.test.jsonl.gz",
        src_field: str | None = None,
        tgt_field: str | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            src_lang: Source language, an ISO 639-1 code.
            tgt_lang: Target language, an ISO 639-1 code.
            train: .jsonl(.gz) pairs, or a prefix P of parallel text files P.<src_lang> / P.<tgt_lang> (.gz allowed).
            val: Validation pairs, same forms as train.
            test: Test pairs, same forms as train.
            src_field: Source field; default src_lang (WMT rows {"translation": {"de": ...}} are found too).
            tgt_field: Target field; default tgt_lang.
            **kwargs: The options of Seq2SeqDataModule (tokenizer, lengths, batch size, datasets source, ...).
        """
        for lang in (src_lang, tgt_lang):
            if lang not in LANGUAGES:
                raise UserInputError(f"unknown language code {lang!r}: use an ISO 639-1 code such as en, de, fr")
        if src_lang == tgt_lang:
            raise UserInputError(f"src_lang and tgt_lang are both {src_lang!r}")
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        super().__init__(
            train=train, val=val, test=test, src_field=src_field or src_lang, tgt_field=tgt_field or tgt_lang, **kwargs
        )

    def _parallel(self, spec: str) -> tuple[Path, Path] | None:
        for suffix in ("", ".gz"):
            src, tgt = Path(f"{spec}.{self.src_lang}{suffix}"), Path(f"{spec}.{self.tgt_lang}{suffix}")
            if src.is_file() or tgt.is_file():
                return src, tgt
        return None

    def _files(self, split: str, spec: str) -> list[Path]:
        if spec.endswith((".jsonl", ".jsonl.gz")) or self._parallel(spec) is None:
            if not spec.endswith((".jsonl", ".jsonl.gz")):
                raise UserInputError(
                    f"{split} data {spec!r}: neither a .jsonl(.gz) file nor a prefix of {spec}.{self.src_lang} / {spec}.{self.tgt_lang}"
                )
            return super()._files(split, spec)
        files = list(self._parallel(spec))
        for f in files:
            if not f.is_file():
                raise UserInputError(f"{split} data file {str(f)!r} does not exist (its other side does)")
            if f.stat().st_size == 0:
                raise UserInputError(f"{split} data file {str(f)!r} is empty")
        return files

    def _rows(self, split: str) -> Iterator[tuple[str, dict]]:
        spec = self.specs[split]
        if self.hparams.hf_dataset is not None or spec.endswith((".jsonl", ".jsonl.gz")):
            yield from super()._rows(split)
            return
        src_path, tgt_path = self._files(split, spec)
        with _open_text(src_path) as fs, _open_text(tgt_path) as ft:
            try:
                src_lines, tgt_lines = fs.read().split("\n"), ft.read().split("\n")
            except UnicodeDecodeError:
                raise UserInputError(f"{split} data {spec!r}: a side is not UTF-8 text") from None
        for lines in (src_lines, tgt_lines):
            if lines and lines[-1] == "":
                lines.pop()  # the final newline
        if len(src_lines) != len(tgt_lines):
            raise UserInputError(
                f"{split} data: {src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; the sides must align line by line"
            )
        for n, (s, t) in enumerate(zip(src_lines, tgt_lines), 1):
            yield f"{src_path}:{n}", {self.src_field: s, self.tgt_field: t}


SUMMARIZATION_SCHEMAS = {
    "cnn_dailymail": ("article", "highlights"),
    "xsum": ("document", "summary"),
    "aclsum": ("document", "summary"),
}


class SummarizationDataModule(Seq2SeqDataModule):
    """Document -> summary pairs; summaries keep one sentence per line (ROUGE-Lsum splits on newlines)."""

    task = "summarization"

    def __init__(
        self,
        schema: Literal["cnn_dailymail", "xsum", "aclsum"] = "aclsum",
        train: str | None = "data/aclsum/train.jsonl.gz",
        val: str | None = "data/aclsum/valid.jsonl.gz",
        test: str | None = "data/aclsum/test.jsonl.gz",
        src_field: str | None = None,
        tgt_field: str | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            schema: Field names of a known corpus: cnn_dailymail (article / highlights), xsum and aclsum
                (document / summary).
            train: Training pairs (.jsonl(.gz)), unless hf_dataset is set.
            val: Validation pairs.
            test: Test pairs.
            src_field: Document field; default the schema's.
            tgt_field: Summary field; default the schema's.
            **kwargs: The options of Seq2SeqDataModule (tokenizer, max_src_len for source truncation, ...).
        """
        if schema not in SUMMARIZATION_SCHEMAS:
            raise UserInputError(f"schema={schema!r}; choose one of {', '.join(SUMMARIZATION_SCHEMAS)}")
        default_src, default_tgt = SUMMARIZATION_SCHEMAS[schema]
        super().__init__(
            train=train,
            val=val,
            test=test,
            src_field=src_field or default_src,
            tgt_field=tgt_field or default_tgt,
            **kwargs,
        )
