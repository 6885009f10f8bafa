"""Tokenizers: a SentencePiece BPE model trained once on the training text and cached, a given SentencePiece
model or Hugging Face `tokenizer.json` (Llama 3, Qwen, SmolLM, ...), or the serialized model that every
checkpoint carries. `Tokenizer(path)` loads either kind."""

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


def is_tokenizer_json(head: bytes) -> bool:
    """Whether a serialized model (or a file's first bytes) is a Hugging Face tokenizer.json, a JSON object; a
    SentencePiece model is a protobuf, whose first byte is a field tag, never "{"."""
    return head[:1] == b"{"


class Tokenizer:
    """Text <-> ids with a SentencePiece model. Ours (`Tokenizer.train`) have ids 0..3 <pad>, <unk>, <bos>, <eos>,
    and bytes fall back to byte tokens, so any UTF-8 round-trips.

    `Tokenizer(path)` of a tokenizer.json file gives an `HFTokenizer`, the same interface over the `tokenizers`
    library, so every caller takes either kind."""

    def __new__(cls, model_file: str | Path | None = None, num_threads: int = -1) -> "Tokenizer":
        # The kind is told by the content, not the name: a shard folder stores either kind as tokenizer.model.
        # (model_file is None where pickle or copy rebuild an instance, of the class they recorded.)
        if cls is Tokenizer and model_file is not None and Path(model_file).is_file():
            with open(model_file, "rb") as f:
                if is_tokenizer_json(f.read(1)):
                    cls = HFTokenizer
        return super().__new__(cls)

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
            raise UserInputError(
                f"tokenizer model {str(path)!r} is neither a SentencePiece model nor a tokenizer.json ({e})"
            ) from None

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
            ids = self.encode(text)
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
        """The serialized model (SentencePiece protobuf, or tokenizer.json text): what checkpoints store, and what
        tells two tokenizers apart."""
        return self.sp.serialized_model_proto()

    @staticmethod
    def from_model_proto(proto: bytes, cache_dir: str | Path | None = None) -> "Tokenizer":
        """The tokenizer of a serialized model (either kind), written once to a file named by its content under
        `<cache_dir>/tokenizers/` (default: `default_cache_dir()`), so data modules can read it by path and their
        token caches, keyed on that path, stay valid."""
        digest = hashlib.sha256(proto).hexdigest()[:16]
        name = f"hf-{digest}.json" if is_tokenizer_json(proto) else f"sp-{digest}.model"
        path = Path(cache_dir or default_cache_dir()) / "tokenizers" / name
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


# Special tokens looked up, in this order, in a tokenizer.json, whose own file does not say which is which
# (tokenizer_config.json does, but it does not travel with the model). The end-of-text token separates the
# packed documents, so it is required; models without a begin-of-text token (GPT-2 style) start with it too.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")
PAD_TOKENS = ("<pad>", "<|pad|>", "<unk>")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` model (tokenizer.json: Llama 3, Qwen, SmolLM, any HF BPE) behind the
    `Tokenizer` interface.

    Text is encoded without the model's post-processor, so no <bos> is added: as with SentencePiece, a document
    is its text's ids followed by <eos>. Special tokens (<eos> included) decode to nothing. A special token's text
    inside a document encodes to that token, as in `transformers`."""

    lines_are_independent = False  # byte-level pre-tokenizers merge runs of newlines: documents encode whole

    def __init__(self, model_file: str | Path, num_threads: int = -1) -> None:
        """num_threads: unused; a document is one `encode` call, which runs on one thread."""
        from tokenizers import Tokenizer as Model

        path = Path(model_file)
        if not path.is_file():
            raise UserInputError(f"tokenizer model {str(path)!r} does not exist")
        self.path = path
        try:
            self.hf = Model.from_file(str(path))
        except Exception as e:  # the library raises plain Exceptions with serde's message
            raise UserInputError(f"tokenizer model {str(path)!r} is not a tokenizer.json ({str(e)[:200]})") from None
        # A tokenizer.json may carry a model_max_length truncation or padding; documents are encoded whole.
        self.hf.no_truncation()
        self.hf.no_padding()
        eos = self._first_token(EOS_TOKENS)
        if eos is None:
            raise UserInputError(
                f"tokenizer {str(path)!r} has no end-of-text token (looked for {', '.join(EOS_TOKENS)}); "
                "documents are separated by it"
            )
        self._eos = eos
        self._bos = self._first_token(BOS_TOKENS)
        pad = self._first_token(PAD_TOKENS)
        # Without a pad token: <bos> pads, which is never a target (LM windows are packed and have no padding).
        self._pad = pad if pad is not None else self.bos_id

    def _first_token(self, candidates: tuple[str, ...]) -> int | None:
        return next((i for t in candidates if (i := self.hf.token_to_id(t)) is not None), None)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._bos if self._bos is not None else self._eos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def model_proto(self) -> bytes:
        # The library's own compact serialization: the same model read from a pretty-printed file compares equal.
        return self.hf.to_str().encode()


def fingerprint(*parts: object) -> str:
    """Short stable hash naming a cache entry."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
