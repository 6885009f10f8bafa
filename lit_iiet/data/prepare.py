"""`python -m lit_iiet prepare OUT --train ...`: tokenize a local corpus once, in parallel, into token shards.

Reads the same sources as LMDataModule (text / JSONL / JSONL.zst / parquet files, folders, globs, or a local
`datasets` copy) and writes, per split, one `.npy` token file per piece of the corpus (a file, or 100k rows of a
`datasets` split), the tokenizer, and `manifest.json` last. ShardedLMDataModule reads the folder. Pieces are
cut the same way whatever the number of workers, so the shards do not depend on it.

`--max_tokens N` keeps the first N tokens of the training split in corpus order (`--max_val_tokens`,
`--max_test_tokens` likewise), tokenizing only the pieces that hold them. A prepare that is stopped (even by
kill -9) resumes when the same command is run again: finished pieces are kept, and the result is the one an
uninterrupted run writes. Progress and an ETA go to stderr every few seconds.

    python -m lit_iiet prepare shards/slimpajama --train 'SlimPajama-627B/train/**/*.jsonl.zst' \\
        --val 'SlimPajama-627B/validation/**/*.jsonl.zst' --tokenizer tokenizers/llama2.model \\
        --max_tokens 15e9 --max_val_tokens 1e8 --workers 16
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from lit_iiet.data.cache import SPLITS
from lit_iiet.data.lm import TextCorpus, encode_document
from lit_iiet.data.shards import FORMAT, MANIFEST, TOKENIZER_FILE, VERSION, file_sha256, token_dtype
from lit_iiet.data.tokenizer import ENCODING_VERSION, Tokenizer
from lit_iiet.errors import UserInputError, exit_on_user_error

NPY_HEADER = 128  # bytes; a fixed-size .npy header is written once the number of tokens is known
FLUSH_TOKENS = 1 << 22
REPORT_TOKENS = 1 << 16  # tokens between updates of the shared progress counter
PROGRESS_SECONDS = 5.0
# While a prepare is under way its folder holds its recipe and a log of finished pieces; both go once the
# manifest is written. They are what lets a rerun of the same command resume, and refuse another command.
STATE, LOG = "prepare.json", "pieces.jsonl"

_tokens_done = None  # a multiprocessing.Value counting the tokens this run has tokenized, for the progress line


def _share_counter(counter) -> None:
    global _tokens_done
    _tokens_done = counter


def _start_worker(counter, parent: int) -> None:
    """A pool worker's set-up: the shared counter, and an exit once the prepare that started it is gone. A pool
    whose parent is killed (kill -9) would otherwise wait for work forever, holding its memory."""
    _share_counter(counter)

    def exit_when_orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


def _count(tokens: int) -> None:
    if _tokens_done is not None:
        with _tokens_done.get_lock():
            _tokens_done.value += tokens


def npy_header(dtype: np.dtype, n: int) -> bytes:
    """A version 1.0 `.npy` header of exactly NPY_HEADER bytes for a 1-D array of n items."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({n},), }}"
    body = NPY_HEADER - 10  # magic (6), version (2), header length (2)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + (text.ljust(body - 1) + "\n").encode("latin1")


def piece_path(split: str, index: int) -> str:
    return f"{split}/{index:05d}.npy"


def tokenize_piece(job: tuple) -> dict:
    """Tokenize one piece into its `.npy` file (written under a temporary name, then renamed)."""
    corpus, tokenizer_file, split, index, piece, out, dtype = job
    tokenizer = Tokenizer(tokenizer_file, num_threads=1)  # the processes are the parallelism
    path = Path(out) / piece_path(split, index)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tokens = documents = unreported = 0
    buffer: list[list[int]] = []
    buffered = 0
    with open(tmp, "wb") as f:
        f.write(bytes(NPY_HEADER))
        for text in corpus.piece_documents(split, piece):
            ids = encode_document(tokenizer, text)
            buffer.append(ids)
            buffered += len(ids)
            unreported += len(ids)
            documents += 1
            if unreported >= REPORT_TOKENS:
                _count(unreported)
                unreported = 0
            if buffered >= FLUSH_TOKENS:
                f.write(np.concatenate([np.asarray(ids, dtype=dtype) for ids in buffer]).tobytes())
                tokens, buffer, buffered = tokens + buffered, [], 0
        if buffer:
            f.write(np.concatenate([np.asarray(ids, dtype=dtype) for ids in buffer]).tobytes())
            tokens += buffered
        f.seek(0)
        f.write(npy_header(dtype, tokens))
    _count(unreported)
    tmp.replace(path)
    return {"split": split, "index": index, "tokens": tokens, "documents": documents}


def truncate_piece(path: Path, dtype: np.dtype, tokens: int, eos: int) -> int:
    """Cut a piece's file to its first `tokens` tokens (a capped split's last piece); returns the documents
    left, the last one possibly cut short."""
    kept = np.load(path, mmap_mode="r")[:tokens]
    documents = int(np.count_nonzero(kept == eos)) + int(tokens > 0 and kept[-1] != eos)
    del kept
    with open(path, "r+b") as f:
        f.truncate(NPY_HEADER + tokens * dtype.itemsize)
        f.write(npy_header(dtype, tokens))
    return documents


def token_cap(option: str, value: float | None) -> int | None:
    if value is None:
        return None
    if not float(value).is_integer() or value < 1:
        raise UserInputError(f"{option}={value:g} must be a whole number of tokens >= 1 (e.g. 15e9)")
    return int(value)


# --- the folder: a new one, or the same prepare resumed ---------------------------------------------------------


def first_difference(there, now, where: str = "") -> tuple[str, object, object] | None:
    """The first place where two recipes differ: (dotted path, value there, value now), or None."""
    if isinstance(there, dict) and isinstance(now, dict):
        for key in list(there) + [k for k in now if k not in there]:
            found = first_difference(there.get(key), now.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if isinstance(there, list) and isinstance(now, list):
        for i, (a, b) in enumerate(zip(there, now)):
            found = first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None if len(there) == len(now) else (f"{where} (count)", len(there), len(now))
    return None if there == now else (where, there, now)


def short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def open_output(out: Path, recipe: dict) -> dict | None:
    """Make `out` ready for this recipe: a new folder gets its state file, an unfinished prepare of the same
    recipe is resumed, a finished one is returned as its manifest. Any other folder is refused before anything in
    it is touched."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {str(out)!r} is a file; prepare writes into a new folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
        if manifest is not None:
            there = manifest.get("recipe")
        elif (out / STATE).is_file():
            there = json.loads((out / STATE).read_text())
        else:
            raise UserInputError(
                f"output {str(out)!r} exists and is neither empty nor a prepare's folder; prepare writes into a new one"
            )
        if there is None:
            raise UserInputError(f"output {str(out)!r} was written by an older prepare (no recipe); use a new folder")
        found = first_difference(there, recipe)
        if found:
            where, a, b = found
            raise UserInputError(
                f"output {str(out)!r} holds a prepare with other settings: {where} is {short(a)} there, {short(b)} "
                "now; rerun its own command to resume it, or write into a new folder"
            )
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STATE, recipe)
    return None


def read_log(out: Path, itemsize: int) -> dict[tuple[str, int], dict]:
    """The pieces an earlier run of this prepare finished whose files are still whole."""
    done = {}
    if not (out / LOG).is_file():
        return done
    for line in (out / LOG).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        file = out / piece_path(record["split"], record["index"])
        # A capped split's last piece is cut at the end: its file is then shorter than the log says, and is redone.
        if file.is_file() and file.stat().st_size == NPY_HEADER + record["tokens"] * itemsize:
            done[record["split"], record["index"]] = record
    return done


# --- scheduling -------------------------------------------------------------------------------------------------


class InlineExecutor:
    """Runs each job when it is submitted, in this process: one worker needs no pool."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
        return future

    def __enter__(self) -> "InlineExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass


class Pieces:
    """Which pieces are finished, and which of the others a capped split still needs.

    A capped split needs the shortest prefix of its pieces holding `cap` tokens. How many that is is known only
    once they are tokenized, so pieces are handed out in order while the tokens finished plus an estimate for
    those under way stay below the cap. The estimate only decides how much work is spent: at most the pieces
    under way when the cap is reached are tokenized in vain; the result never depends on it."""

    def __init__(self, counts: dict[str, int], caps: dict[str, int | None], done: dict) -> None:
        self.counts, self.caps, self.done = counts, caps, done
        self.todo = {split: deque(i for i in range(n) if (split, i) not in done) for split, n in counts.items()}
        self.first_open = dict.fromkeys(counts, 0)  # pieces before it are all finished...
        self.prefix_tokens = dict.fromkeys(counts, 0)  # ...holding this many tokens
        # Running sums, not a pass over `done` per question: SlimPajama has 59k pieces.
        self.finished = {split: [0, 0] for split in counts}  # pieces, tokens
        for record in done.values():
            self._add(record)

    def _add(self, record: dict) -> None:
        self.finished[record["split"]][0] += 1
        self.finished[record["split"]][1] += record["tokens"]

    def finish(self, record: dict) -> None:
        self.done[record["split"], record["index"]] = record
        self._add(record)

    def _advance(self, split: str) -> None:
        while (split, self.first_open[split]) in self.done:
            self.prefix_tokens[split] += self.done[split, self.first_open[split]]["tokens"]
            self.first_open[split] += 1

    def mean_tokens(self, split: str) -> float | None:
        pieces, tokens = self.finished[split]
        return tokens / pieces if pieces else None

    def next_piece(self, split: str) -> tuple[str, int] | None:
        """The split's next piece to tokenize now; None if it has none or must wait for pieces under way."""
        todo, cap = self.todo[split], self.caps[split]
        while todo:
            index = todo[0]
            if cap is None:
                return split, todo.popleft()
            self._advance(split)
            earlier = range(self.first_open[split], index)
            known = self.prefix_tokens[split] + sum(
                self.done[split, i]["tokens"] for i in earlier if (split, i) in self.done
            )
            pending = sum(1 for i in earlier if (split, i) not in self.done)
            if pending == 0 and known >= cap:
                todo.clear()  # the cap is reached: no later piece is needed
                return None
            if known + pending * (self.mean_tokens(split) or 0) >= cap:
                return None
            return split, todo.popleft()
        return None

    def needed(self, split: str) -> list[dict]:
        """The finished pieces a split keeps, in order: all, or the prefix that reaches its cap."""
        kept, tokens = [], 0
        for i in range(self.counts[split]):
            if self.caps[split] is not None and tokens >= self.caps[split]:
                break
            kept.append(self.done[split, i])
            tokens += kept[-1]["tokens"]
        return kept


class Progress:
    """A line on stderr every PROGRESS_SECONDS: pieces, tokens, tokens/s and an estimate of the time left."""

    def __init__(self, pieces: Pieces, counter, earlier_tokens: int) -> None:
        self.pieces, self.counter, self.earlier_tokens = pieces, counter, earlier_tokens
        self.start = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(PROGRESS_SECONDS):
            print(self.line(), file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def line(self) -> str:
        p = self.pieces
        tokens_now = self.counter.value
        seconds = time.perf_counter() - self.start
        rate = tokens_now / seconds if seconds > 0 else 0.0
        pieces_done = sum(count for count, _ in p.finished.values())
        fallback = sum(t for _, t in p.finished.values()) / pieces_done if pieces_done else None
        pieces_needed = expected = 0.0
        for split, n in p.counts.items():
            count, tokens = p.finished[split]
            mean = p.mean_tokens(split) or fallback or 0  # this split's pieces, or any split's
            guess, cap = tokens + (n - count) * mean, p.caps[split]
            # a capped split needs about cap / mean pieces, not all of them
            pieces_needed += n if cap is None or not mean else min(n, max(count, -(-cap // max(int(mean), 1))))
            expected += guess if cap is None else min(cap, guess)
        done = self.earlier_tokens + tokens_now
        eta = "?" if fallback is None or rate <= 0 else duration(max(0.0, expected - done) / rate)
        return f"prepare: {pieces_done}/{int(pieces_needed)} pieces, {human(done)} tokens, {human(rate)} tokens/s, ETA {eta}"


def human(n: float) -> str:
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --- the command ------------------------------------------------------------------------------------------------


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
    max_tokens: float | None = None,
    max_val_tokens: float | None = None,
    max_test_tokens: float | None = None,
    workers: int = 1,
) -> dict:
    """Tokenize a local corpus into token shards for ShardedLMDataModule.

    Args:
        output: A new or empty folder for the shards, or the folder of an unfinished prepare of the same command
            (it is resumed); any other folder is refused and left as it is.
        train: Training text: .txt(.gz) files (each one document), .jsonl(.gz/.zst) files (one document per
            line), .parquet files (one document per row), folders of them, or glob patterns. Ignored when
            hf_dataset is set.
        val: Validation text, same forms as train.
        test: Test text, same forms as train.
        text_field: The JSONL field / parquet or dataset column holding the text.
        hf_dataset: A local `datasets` source instead of files: a `save_to_disk` folder, or a dataset already in
            the local `datasets` cache (nothing is downloaded).
        hf_name: The dataset configuration name.
        hf_splits: Our split -> the dataset's split, default {"train": "train", "val": "validation", "test": "test"}.
        tokenizer: A SentencePiece model (e.g. Llama-2's tokenizer.model); None trains a BPE model of vocab_size
            on the training text. Either way it is copied into the folder.
        vocab_size: Vocabulary size of the tokenizer trained when tokenizer is None.
        tokenizer_max_lines: Lines sampled from the training text to train the tokenizer.
        max_tokens: Keep only the first N training tokens in corpus order (e.g. 15e9); only the pieces holding
            them are tokenized (plus at most the pieces under way when the cap is reached).
        max_val_tokens: The same cap for the validation split.
        max_test_tokens: The same cap for the test split.
        workers: Processes tokenizing pieces (files, or 100k-row ranges of a dataset) in parallel. The result
            does not depend on it, and a resumed prepare may use another number.

    Returns:
        The manifest written to OUTPUT/manifest.json.
    """
    out = Path(output)
    if workers < 1:
        raise UserInputError(f"workers={workers} must be >= 1")
    options = dict(zip(SPLITS, ("max_tokens", "max_val_tokens", "max_test_tokens")))
    caps = {s: token_cap(options[s], v) for s, v in zip(SPLITS, (max_tokens, max_val_tokens, max_test_tokens))}
    corpus = TextCorpus(train, val, test, text_field, hf_dataset, hf_name, hf_splits)
    splits = [s for s in SPLITS if corpus.has_split(s)]
    if not splits:
        raise UserInputError("no data given: set --train/--val/--test or --hf_dataset")
    for split, cap in caps.items():
        if cap is not None and split not in splits:
            raise UserInputError(f"{options[split]} is set but there is no {split} data to cap")
    if tokenizer is not None:
        Tokenizer(tokenizer)  # a readable SentencePiece model, or a one-line error
    elif "train" not in splits:
        raise UserInputError("no training text to train a tokenizer on: give --train or --tokenizer")

    recipe = {
        "format": FORMAT,
        "version": VERSION,
        "encoding_version": ENCODING_VERSION,
        "source": corpus.describe(),
        "tokenizer": (
            {"sha256": file_sha256(Path(tokenizer))}
            if tokenizer is not None
            else {"train_bpe_vocab_size": vocab_size, "max_lines": tokenizer_max_lines}
        ),
        "max_tokens": {s: caps[s] for s in splits},
    }
    finished = open_output(out, recipe)
    if finished is not None:
        for leftover in (STATE, LOG):  # a run stopped between writing the manifest and tidying up
            (out / leftover).unlink(missing_ok=True)
        print(f"{out} already holds this prepare's shards; nothing to do", file=sys.stderr)
        return finished
    for stale in [*out.glob("*.tmp[0-9]*"), *out.glob("*/*.tmp[0-9]*")]:
        stale.unlink()  # half-written files of a run that was killed

    started = time.perf_counter()
    tokenizer_file = out / TOKENIZER_FILE
    if tokenizer_file.is_file():
        pass  # written, whole (it is renamed into place), by the run being resumed
    elif tokenizer is not None:
        tmp = out / f"{TOKENIZER_FILE}.tmp{os.getpid()}"
        shutil.copyfile(tokenizer, tmp)
        tmp.replace(tokenizer_file)
    else:
        print(f"training a BPE tokenizer of {vocab_size} pieces on the training text", file=sys.stderr)
        Tokenizer.train(corpus.training_lines(), tokenizer_file, vocab_size, tokenizer_max_lines)
    vocab = Tokenizer(tokenizer_file).vocab_size
    dtype = token_dtype(vocab)
    tokenizing = time.perf_counter()

    corpus_pieces = {}
    for split in splits:
        (out / split).mkdir(exist_ok=True)
        corpus_pieces[split] = corpus.pieces(split)
    done = read_log(out, dtype.itemsize)
    pieces = Pieces({s: len(p) for s, p in corpus_pieces.items()}, {s: caps[s] for s in splits}, done)
    earlier_tokens = sum(r["tokens"] for r in done.values())
    if done:
        print(f"resuming: {len(done)} pieces ({earlier_tokens:,} tokens) are already tokenized", file=sys.stderr)

    counter = multiprocessing.Value("q", 0)
    _share_counter(counter)
    executor = (
        InlineExecutor()
        if workers == 1
        else ProcessPoolExecutor(max_workers=workers, initializer=_start_worker, initargs=(counter, os.getpid()))
    )
    job_corpus = corpus.without_file_lists()  # pickled into every job
    with executor as pool, Progress(pieces, counter, earlier_tokens) as progress, open(out / LOG, "a") as log:
        running: dict[Future, tuple] = {}

        def hand_out() -> None:
            for split in splits:
                while len(running) < workers and (key := pieces.next_piece(split)) is not None:
                    job = (
                        job_corpus,
                        str(tokenizer_file),
                        split,
                        key[1],
                        corpus_pieces[split][key[1]],
                        str(out),
                        dtype,
                    )
                    running[pool.submit(tokenize_piece, job)] = key

        hand_out()
        while running:
            for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                del running[future]
                record = future.result()
                log.write(json.dumps(record) + "\n")
                log.flush()  # in the page cache: survives kill -9 of this process
                pieces.finish(record)
            hand_out()
    print(progress.line(), file=sys.stderr)
    seconds = time.perf_counter() - tokenizing
    _share_counter(None)

    eos = Tokenizer(tokenizer_file).eos_id
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "tokenizer_sha256": file_sha256(tokenizer_file),
        "vocab_size": vocab,
        "encoding_version": ENCODING_VERSION,
        "recipe": recipe,
        "splits": {},
    }
    for split in splits:
        kept, files, tokens = pieces.needed(split), [], 0
        for record in kept:
            part = {"path": piece_path(split, record["index"]), "offset": NPY_HEADER}
            part |= {"tokens": record["tokens"], "documents": record["documents"]}
            if caps[split] is not None and tokens + record["tokens"] > caps[split]:
                part["tokens"] = caps[split] - tokens
                part["documents"] = truncate_piece(out / part["path"], dtype, part["tokens"], eos)
            files.append(part)
            tokens += part["tokens"]
        paths = {part["path"] for part in files}
        for file in (out / split).glob("*.npy"):
            if f"{split}/{file.name}" not in paths:  # tokenized before the cap was known to be reached
                file.unlink()
        manifest["splits"][split] = {
            "tokens": tokens,
            "documents": sum(p["documents"] for p in files),
            "files": files,
        }
    write_json(out / MANIFEST, manifest)  # its presence marks a finished folder
    for leftover in (STATE, LOG):
        (out / leftover).unlink()

    for split, info in manifest["splits"].items():
        cap = f" (capped at {caps[split]:,})" if caps[split] is not None else ""
        print(f"{split}: {info['tokens']:,} tokens{cap}, {info['documents']:,} documents, {len(info['files'])} files")
    print(
        f"{counter.value:,} tokens tokenized in {seconds:.1f} s ({counter.value / max(seconds, 1e-9):,.0f} tokens/s "
        f"with {workers} workers); {time.perf_counter() - started:.1f} s in all -> {out}"
    )
    return manifest


def main(args: list[str] | None = None) -> None:
    """`python -m lit_iiet prepare`; `python -m lit_iiet.data.prepare` is an alias."""
    from jsonargparse import CLI

    with exit_on_user_error():
        CLI(prepare, args=args, as_positional=True, prog="python -m lit_iiet prepare")


if __name__ == "__main__":
    main()
