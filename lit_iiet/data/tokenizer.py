"""SentencePiece BPE tokenizer: trained once on the training text and cached, loaded from a given model, or
restored from the serialized model that every checkpoint carries."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from lit_iiet.errors import UserInputError

# Bump when the training options below change, so that cached tokenizers are retrained.
TOKENIZER_VERSION = 1
# Bump when the ids `Tokenizer.encode_document` gives change, so that cached token ids are made again
# (2: whole-document encoding for models with a dummy prefix, which line-by-line encoding got wrong).
ENCODING_VERSION = 2


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIT_IIET_CACHE", Path.home() / ".cache" / "lit_iiet"))


class Tokenizer:
    """Text <-> ids. Ids 0..3 are <pad>, <unk>, <bos>, <eos>; bytes fall back to byte tokens, so any UTF-8 round-trips."""

    def __init__(self, model_file: str | Path, num_threads: int = -1) -> None:
        """num_threads: threads a batch encode may use (-1: all cores; 1 where processes already run in parallel)."""
        path = Path(model_file)
        if not path.is_file():
            raise UserInputError(f"tokenizer model {str(path)!r} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(num_threads=num_threads)
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserInputError(f"tokenizer model {str(path)!r} is not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        # Models trained elsewhere (e.g. Llama-2's) may have no pad piece; <unk> then pads (and is never a target).
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def encode_document(self, text: str, eos: bool = True) -> list[int]:
        """The ids `encode(text)` gives for a whole (multi-line) document, followed by <eos> unless eos=False.

        Where lines are independent (see `lines_are_independent`) the lines are encoded as one batch, which
        SentencePiece spreads over all cores and gives exactly the same ids; otherwise (e.g. a Llama / Mistral
        model, whose dummy prefix would put a "▁" before every line) the document is encoded in one piece.
        """
        if self.lines_are_independent:
            lines = self.sp.encode(text.split("\n"))
            ids = [i for line in lines[:-1] for i in (*line, self._newline_id)] + lines[-1]
        else:
            ids = self.sp.encode(text)
        if eos:
            ids.append(self.eos_id)
        return ids

    @functools.cached_property
    def lines_are_independent(self) -> bool:
        """Whether encoding a text line by line gives the ids of encoding it whole: no dummy prefix (which
        would start every line with "▁"), no whitespace clean-up (which would strip every line's ends), and
        "\n" a user-defined piece (BPE never merges across it). Models from `Tokenizer.train` are such."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto.FromString(self.model_proto)
        # piece_to_id gives <unk> for a piece the model lacks, and <unk> is no user-defined piece.
        newline = proto.pieces[self.sp.piece_to_id("\n")]
        user_defined = newline.piece == "\n" and newline.type == pb.ModelProto.SentencePiece.USER_DEFINED
        return (
            user_defined
            and not proto.normalizer_spec.add_dummy_prefix
            and not proto.normalizer_spec.remove_extra_whitespaces
        )

    @functools.cached_property
    def _newline_id(self) -> int:
        return self.sp.piece_to_id("\n")

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model: what checkpoints store, and what tells two tokenizers apart."""
        return self.sp.serialized_model_proto()

    @staticmethod
    def from_model_proto(proto: bytes, cache_dir: str | Path | None = None) -> "Tokenizer":
        """The tokenizer of a serialized model, written once to a file named by its content under
        `<cache_dir>/tokenizers/` (default: `default_cache_dir()`), so data modules can read it by path and their
        token caches, keyed on that path, stay valid."""
        digest = hashlib.sha256(proto).hexdigest()[:16]
        path = Path(cache_dir or default_cache_dir()) / "tokenizers" / f"sp-{digest}.model"
        if not path.is_file() or path.read_bytes() != proto:  # a damaged copy is replaced
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(proto)
            tmp.replace(path)
        return Tokenizer(path)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @staticmethod
    def train(lines: Iterator[str], model_file: str | Path, vocab_size: int, max_lines: int = 2_000_000) -> "Tokenizer":
        """Train a BPE model on an iterator of lines and write it to model_file (atomically)."""
        model_file = Path(model_file)
        model_file.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        # SentencePiece turns an exception raised by the iterator (e.g. a UserInputError naming a bad data file)
        # into a RuntimeError with a Python traceback in its message: keep the original to re-raise it as is.
        source_errors: list[BaseException] = []

        def guarded_lines() -> Iterator[str]:
            try:
                yield from lines
            except BaseException as e:
                source_errors.append(e)
                raise

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=guarded_lines(),
                model_writer=buffer,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=1.0,
                byte_fallback=True,
                normalization_rule_name="identity",  # keep the text exactly as written
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                user_defined_symbols=["\n"],
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                input_sentence_size=max_lines,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if source_errors:  # reading the text failed, not the training
                raise source_errors[0] from None
            raise UserInputError(f"could not train a tokenizer of vocab_size={vocab_size} on this text: {e}") from None
        tmp = model_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(model_file)
        return Tokenizer(model_file)


def fingerprint(*parts: object) -> str:
    """Short stable hash naming a cache entry."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
