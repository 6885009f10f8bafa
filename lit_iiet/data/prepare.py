"""`python -m lit_iiet.data.prepare OUT --train ...`: tokenize a local corpus once, in parallel, into token shards.

Reads the same sources as LMDataModule (text / JSONL files, folders, globs, or a local `datasets` copy) and
writes, per split, one `.npy` token file per piece of the corpus (a file, or 100k rows of a `datasets` split),
the tokenizer, and `manifest.json` last. ShardedLMDataModule reads the folder. Pieces are cut the same way
whatever the number of workers, so the shards do not depend on it.

    python -m lit_iiet.data.prepare shards/slimpajama --train 'slimpajama/train/**/*.jsonl' \\
        --val 'slimpajama/validation/**/*.jsonl' --tokenizer tokenizers/llama2.model --workers 16
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lit_iiet.data.cache import SPLITS
from lit_iiet.data.lm import TextCorpus, encode_document
from lit_iiet.data.shards import FORMAT, MANIFEST, TOKENIZER_FILE, VERSION, file_sha256, token_dtype
from lit_iiet.data.tokenizer import ENCODING_VERSION, Tokenizer
from lit_iiet.errors import UserInputError, exit_on_user_error

NPY_HEADER = 128  # bytes; a fixed-size .npy header is written once the number of tokens is known
FLUSH_TOKENS = 1 << 22


def npy_header(dtype: np.dtype, n: int) -> bytes:
    """A version 1.0 `.npy` header of exactly NPY_HEADER bytes for a 1-D array of n items."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({n},), }}"
    body = NPY_HEADER - 10  # magic (6), version (2), header length (2)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + (text.ljust(body - 1) + "\n").encode("latin1")


def tokenize_piece(job: tuple) -> dict:
    """Tokenize one piece into its `.npy` file (written under a temporary name, then renamed)."""
    corpus, tokenizer_file, split, index, piece, out, dtype = job
    tokenizer = Tokenizer(tokenizer_file, num_threads=1)  # the processes are the parallelism
    path = Path(out) / split / f"{index:05d}.npy"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tokens = documents = 0
    buffer: list[list[int]] = []
    buffered = 0
    with open(tmp, "wb") as f:
        f.write(bytes(NPY_HEADER))
        for text in corpus.piece_documents(split, piece):
            ids = encode_document(tokenizer, text)
            buffer.append(ids)
            buffered += len(ids)
            documents += 1
            if buffered >= FLUSH_TOKENS:
                f.write(np.concatenate([np.asarray(ids, dtype=dtype) for ids in buffer]).tobytes())
                tokens, buffer, buffered = tokens + buffered, [], 0
        if buffer:
            f.write(np.concatenate([np.asarray(ids, dtype=dtype) for ids in buffer]).tobytes())
            tokens += buffered
        f.seek(0)
        f.write(npy_header(dtype, tokens))
    tmp.replace(path)
    return {"path": f"{split}/{path.name}", "offset": NPY_HEADER, "tokens": tokens, "documents": documents}


def prepare(
    output: str,
    train: str | list[str] | None = None,
    val: str | list[str] | None = None,
    test: str | list[str] | None = None,
    text_field: str = "text",
    hf_dataset: str | None = None,
    hf_name: str | None = None,
    hf_splits: dict[str, str] | None = None,
    tokenizer: str | None = None,
    vocab_size: int = 32000,
    tokenizer_max_lines: int = 2_000_000,
    workers: int = 1,
) -> dict:
    """Tokenize a local corpus into token shards for ShardedLMDataModule.

    Args:
        output: A new or empty folder for the shards; nothing that exists is overwritten.
        train: Training text: .txt(.gz) files (each one document), .jsonl(.gz) files (one document per line),
            folders of them, or glob patterns. Ignored when hf_dataset is set.
        val: Validation text, same forms as train.
        test: Test text, same forms as train.
        text_field: The JSONL / dataset column holding the text.
        hf_dataset: A local `datasets` source instead of files: a `save_to_disk` folder, or a dataset already in
            the local `datasets` cache (nothing is downloaded).
        hf_name: The dataset configuration name.
        hf_splits: Our split -> the dataset's split, default {"train": "train", "val": "validation", "test": "test"}.
        tokenizer: A SentencePiece model (e.g. Llama-2's tokenizer.model); None trains a BPE model of vocab_size
            on the training text. Either way it is copied into the folder.
        vocab_size: Vocabulary size of the tokenizer trained when tokenizer is None.
        tokenizer_max_lines: Lines sampled from the training text to train the tokenizer.
        workers: Processes tokenizing pieces (files, or 100k-row ranges of a dataset) in parallel.

    Returns:
        The manifest written to OUTPUT/manifest.json.
    """
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"output {output!r} exists and is not an empty folder; prepare writes into a new one")
    if workers < 1:
        raise UserInputError(f"workers={workers} must be >= 1")
    corpus = TextCorpus(train, val, test, text_field, hf_dataset, hf_name, hf_splits)
    splits = [s for s in SPLITS if corpus.has_split(s)]
    if not splits:
        raise UserInputError("no data given: set --train/--val/--test or --hf_dataset")
    if tokenizer is not None:
        Tokenizer(tokenizer)  # a readable SentencePiece model, or a one-line error
    elif "train" not in splits:
        raise UserInputError("no training text to train a tokenizer on: give --train or --tokenizer")

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer_file = out / TOKENIZER_FILE
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tokenizer_file)
    else:
        print(f"training a BPE tokenizer of {vocab_size} pieces on the training text", file=sys.stderr)
        Tokenizer.train(corpus.training_lines(), tokenizer_file, vocab_size, tokenizer_max_lines)
    vocab = Tokenizer(tokenizer_file).vocab_size
    dtype = token_dtype(vocab)
    tokenizing = time.perf_counter()

    jobs = []
    for split in splits:
        (out / split).mkdir()
        jobs += [
            (corpus, str(tokenizer_file), split, i, piece, str(out), dtype)
            for i, piece in enumerate(corpus.pieces(split))
        ]
    if workers == 1:
        parts = [tokenize_piece(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(tokenize_piece, jobs))  # in job order, whichever worker finishes first
    seconds = time.perf_counter() - tokenizing

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "tokenizer_sha256": file_sha256(tokenizer_file),
        "vocab_size": vocab,
        "splits": {},
        "source": repr(corpus.source_id()),
        "encoding_version": ENCODING_VERSION,
        "tokenize_seconds": round(seconds, 3),
        "workers": workers,
    }
    for split in splits:
        files = [part for job, part in zip(jobs, parts) if job[2] == split]
        manifest["splits"][split] = {
            "tokens": sum(p["tokens"] for p in files),
            "documents": sum(p["documents"] for p in files),
            "files": files,
        }
    tmp = out / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)  # last: its presence marks a finished folder

    total = sum(info["tokens"] for info in manifest["splits"].values())
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['files'])} files")
    print(
        f"{total:,} tokens in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} tokens/s with {workers} workers); "
        f"{time.perf_counter() - started:.1f} s in all -> {out}"
    )
    return manifest


def main(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    with exit_on_user_error():
        CLI(prepare, args=args, as_positional=True, prog="python -m lit_iiet.data.prepare")


if __name__ == "__main__":
    main()
