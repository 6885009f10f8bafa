"""Tests of the language-modelling data: tokenizer, LMDataModule sources, packing, caching, sampler.

Everything is real: SentencePiece models are trained on small text, data files are written under tmp_path and
every cache goes to a temporary directory (never the home directory).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_iiet.data.lm import LMDataModule, ResumableSampler, encode_document
from lit_iiet.data.tokenizer import Tokenizer
from lit_iiet.errors import UserInputError

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
PAD, UNK, BOS, EOS = 0, 1, 2, 3


def read_corpus(split: str) -> str:
    """The decompressed text of a shipped split ("train", "valid" or "test")."""
    with gzip.open(CORPUS / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Any datamodule built without cache_dir caches under tmp_path, not under ~/.cache."""
    monkeypatch.setenv("LIT_IIET_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A small BPE tokenizer (vocab 400) trained on part of the validation plays."""
    lines = [line for line in read_corpus("valid").splitlines()[:3000] if line.strip()]
    return Tokenizer.train(iter(lines), tmp_path_factory.mktemp("tok") / "small.model", vocab_size=400)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> LMDataModule:
    """The shipped corpus, tokenizer (vocab 512) trained once for the module, prepared and set up."""
    dm = LMDataModule(
        vocab_size=512,
        seq_len=64,
        batch_size=4,
        shuffle=True,
        cache_dir=str(tmp_path_factory.mktemp("shakespeare-cache")),
    )
    dm.prepare_data()
    dm.setup()
    return dm


def local_dm(tmp_path: Path, tok: Tokenizer | None = None, **kwargs) -> LMDataModule:
    """A datamodule over local files, caching under tmp_path/cache, using `tok` when given; prepared and set up."""
    kwargs = {"val": None, "test": None, "seq_len": 8, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **kwargs}
    if tok is not None:
        kwargs["tokenizer"] = str(tok.path)
    dm = LMDataModule(**kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def split_documents(dm: LMDataModule, split: str = "train") -> list[str]:
    """The packed token stream of a split cut at every <eos> and decoded: the documents it was built from."""
    ids = dm.tokens[split].tolist()
    assert ids and ids[-1] == EOS, "the stream must end with <eos>"
    docs, current = [], []
    for i in ids:
        if i == EOS:
            docs.append(dm.tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    return docs


def unpack(windows: list[torch.Tensor]) -> list[int]:
    """Consecutive packed windows overlap by one token (last target = next first input); undo that."""
    out = windows[0].tolist()
    for w in windows[1:]:
        assert w[0].item() == out[-1], "consecutive windows must share one token"
        out += w[1:].tolist()
    return out


# --- tokenizer -------------------------------------------------------------------------------------------------

ROUND_TRIP = [
    "To be, or not to be: that is the question.",
    "line one\nline two\n\nafter a blank line\n",
    "  two leading spaces,   three inside,\ttab and trailing  ",
    " one leading space",
    "\n\nstarts with newlines",
    "café, naïve, Ångström, façade",
    "an em dash — and “quotes”",
    "日本語のテキスト",
    "emoji 😀🎭 and ZWJ 👩‍👩‍👧",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_exactly(tok, text):
    """decode(encode(s)) == s for plain text, odd whitespace, newlines and non-ASCII UTF-8."""
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_uses_byte_fallback_not_unk(tok):
    """Characters never seen in training become byte tokens, never <unk>."""
    text = "日本 😀"
    ids = tok.encode(text)
    assert UNK not in ids
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert sum(re.fullmatch(r"<0x[0-9A-F]{2}>", p) is not None for p in pieces) == len(text.replace(" ", "").encode())


def test_tokenizer_special_ids(tok):
    """<pad>, <unk>, <s>, </s> are ids 0, 1, 2, 3, the vocab has the requested size, text never encodes to them."""
    assert (tok.pad_id, tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (PAD, UNK, BOS, EOS)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.vocab_size == 400
    ids = tok.encode("Some ordinary text,\nwith two lines.")
    assert min(ids) > EOS and max(ids) < tok.vocab_size


def test_tokenizer_missing_model_file(tmp_path):
    """A tokenizer path that does not exist is a UserInputError naming it."""
    path = tmp_path / "nope.model"
    with pytest.raises(UserInputError, match=re.escape(str(path))):
        Tokenizer(path)


def test_tokenizer_file_that_is_not_a_model(tmp_path):
    """A file that is not a SentencePiece model is a UserInputError naming it."""
    path = tmp_path / "junk.model"
    path.write_text("this is not a sentencepiece model\n")
    with pytest.raises(UserInputError, match=re.escape(str(path))):
        Tokenizer(path)


def test_tokenizer_training_error_from_the_text_is_not_disguised(tmp_path):
    """An error raised while reading the training text reaches the caller as it was raised, not wrapped as a
    tokenizer-training failure with a Python traceback inside the message."""

    def lines():
        yield from ["some text to train on"] * 20
        raise UserInputError("data file 'x.txt' is broken")

    with pytest.raises(UserInputError) as info:
        Tokenizer.train(lines(), tmp_path / "t.model", vocab_size=300)
    assert str(info.value) == "data file 'x.txt' is broken"
    assert not (tmp_path / "t.model").exists()


# --- the shipped corpus -------------------------------------------------------------------------------------------


def test_shakespeare_splits_load(shakespeare):
    """All three splits are tokenized, non-trivial, end with <eos> and use only ids of the tokenizer."""
    assert set(shakespeare.tokens) == {"train", "val", "test"}
    for split, ids in shakespeare.tokens.items():
        assert ids.dtype == torch.int32 and ids.dim() == 1
        assert len(ids) > 100_000, split
        assert ids[-1].item() == EOS
        assert 0 <= ids.min().item() and ids.max().item() < 512
    assert len(shakespeare.tokens["train"]) > 10 * len(shakespeare.tokens["val"])


def test_shakespeare_vocab_size(shakespeare):
    """The trained tokenizer has exactly the requested vocabulary."""
    assert shakespeare.tokenizer.vocab_size == 512


def test_shakespeare_stream_decodes_to_the_text(shakespeare):
    """The validation token stream is exactly the validation text followed by <eos>."""
    assert split_documents(shakespeare, "val") == [read_corpus("valid")]


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_windows_are_shifted_stream_slices(shakespeare, split):
    """Eval batches are (batch, seq_len + 1) windows read in order: row r is stream[r*L : r*L + L + 1], so the
    targets (window[1:]) are the inputs (window[:-1]) shifted by one token in the stream."""
    seq_len, stream = 64, shakespeare.tokens[split].long()
    loader = shakespeare.val_dataloader() if split == "val" else shakespeare.test_dataloader()
    assert len(loader.dataset) == (len(stream) - 1) // seq_len
    for b, batch in enumerate(loader):
        assert batch.shape == (4, seq_len + 1) and batch.dtype == torch.long
        for r, window in enumerate(batch):
            start = (b * 4 + r) * seq_len
            assert torch.equal(window[:-1], stream[start : start + seq_len])  # inputs
            assert torch.equal(window[1:], stream[start + 1 : start + seq_len + 1])  # targets
        if b == 2:
            break


def test_train_windows_follow_the_sampler(shakespeare):
    """Training batches are the shuffled windows the sampler names, each a slice of the train stream."""
    seq_len, stream = 64, shakespeare.tokens["train"].long()
    loader = shakespeare.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler)
    indices = list(loader.sampler)
    assert indices != sorted(indices), "training windows should be shuffled"
    for b, batch in enumerate(loader):
        assert batch.shape == (4, seq_len + 1)
        for r, window in enumerate(batch):
            start = indices[b * 4 + r] * seq_len
            assert torch.equal(window, stream[start : start + seq_len + 1])
        if b == 2:
            break


def test_token_cache_is_reused(shakespeare):
    """A second datamodule with the same settings reads the cached tokenizer and tokens instead of rebuilding."""
    paths = [shakespeare.tokenizer_path()] + [shakespeare.token_path(s) for s in ("train", "val", "test")]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = LMDataModule(vocab_size=512, seq_len=64, batch_size=4, cache_dir=str(shakespeare.cache_dir))
    assert [again.tokenizer_path()] + [again.token_path(s) for s in ("train", "val", "test")] == paths
    again.prepare_data()
    again.setup()
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert sorted(p.name for p in (shakespeare.cache_dir / "tokens").iterdir()) == sorted(p.name for p in paths[1:])
    for split in ("train", "val", "test"):
        assert torch.equal(again.tokens[split], shakespeare.tokens[split])


def test_heldout_plays_are_not_in_train():
    """No long line of the validation or test plays occurs in the training text (the split is by play)."""
    train = read_corpus("train")
    train_lines = set(train.splitlines())
    long_train = [line for line in train.splitlines() if len(line) >= 50]
    assert long_train[1000] in train and long_train[1000] in train_lines  # the check below can see a hit
    for split in ("valid", "test"):
        long_lines = [line for line in read_corpus(split).splitlines() if len(line) >= 50]
        assert len(long_lines) > 500
        assert not [line for line in long_lines if line in train_lines], split
        for line in long_lines[:: len(long_lines) // 20]:  # a sample, as substrings anywhere in the text
            assert line not in train, (split, line)


# --- local files ----------------------------------------------------------------------------------------------

DOCS = ["First document.\nIt has two lines.\n", "Second one — with an em dash.", "Third:\n\n  indented line\n"]


def test_directory_of_txt_files(tmp_path, tok):
    """A directory (searched recursively) gives its .txt files in sorted order, one document each, <eos>-separated."""
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (root / "b.txt").write_text(DOCS[1], encoding="utf-8")
    (root / "sub" / "c.txt").write_text(DOCS[2], encoding="utf-8")
    (root / "notes.md").write_text("ignored, not a text suffix")
    dm = local_dm(tmp_path, tok, train=str(root))
    assert [p.name for p in dm.corpus.files("train")] == ["a.txt", "b.txt", "c.txt"]
    assert split_documents(dm) == DOCS
    assert dm.tokens["train"].tolist().count(EOS) == 3


def test_jsonl_with_custom_text_field(tmp_path, tok):
    """Each JSONL line is one document, read from text_field; blank lines are skipped, other fields ignored."""
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": i, "body": doc, "text": "not this"}) for i, doc in enumerate(DOCS)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    dm = local_dm(tmp_path, tok, train=str(path), text_field="body")
    assert split_documents(dm) == DOCS


def test_gzipped_files(tmp_path, tok):
    """.txt.gz and .jsonl.gz read like their plain versions."""
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[0])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": d}) for d in DOCS[1:]))
    dm = local_dm(tmp_path, tok, train=[str(tmp_path / "a.txt.gz"), str(tmp_path / "b.jsonl.gz")])
    assert split_documents(dm) == DOCS


def test_glob_pattern_and_all_splits(tmp_path, tok):
    """Glob patterns (recursive ** too) select files per split; each split gets its own documents."""
    for i, doc in enumerate(DOCS):
        (tmp_path / "train" / f"part{i}").mkdir(parents=True)
        (tmp_path / "train" / f"part{i}" / "doc.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "train" / "part0" / "skip.csv").write_text("a,b\n")
    (tmp_path / "val.txt").write_text("validation text\n")
    (tmp_path / "test.txt").write_text("test text\n")
    dm = local_dm(
        tmp_path,
        tok,
        train=str(tmp_path / "train" / "**" / "*.txt"),
        val=str(tmp_path / "val*.txt"),
        test=str(tmp_path / "t?st.txt"),
        seq_len=2,
    )
    assert split_documents(dm, "train") == DOCS
    assert split_documents(dm, "val") == ["validation text\n"]
    assert split_documents(dm, "test") == ["test text\n"]


def test_tokenizer_trained_on_local_text(tmp_path):
    """Without a given tokenizer one is trained on the training files, cached under cache_dir/tokenizers."""
    path = tmp_path / "train.txt"
    path.write_text(read_corpus("test")[:50_000], encoding="utf-8")
    dm = local_dm(tmp_path, train=str(path), vocab_size=320)
    assert dm.tokenizer.vocab_size == 320
    assert dm.tokenizer.path.parent == tmp_path / "cache" / "tokenizers"
    assert split_documents(dm) == [path.read_text(encoding="utf-8")]


def test_default_cache_dir_from_env(tmp_path, tok):
    """Without cache_dir the cache goes to $LIT_IIET_CACHE (set to tmp_path by the autouse fixture)."""
    (tmp_path / "a.txt").write_text("some text\n")
    dm = local_dm(tmp_path, tok, train=str(tmp_path / "a.txt"), cache_dir=None)
    assert dm.token_path("train").is_relative_to(tmp_path / "default-cache")
    assert dm.token_path("train").exists()


def test_token_cache_depends_on_text_field(tmp_path, tok):
    """The same JSONL file read through another text_field is a different corpus, not a cache hit."""
    path = tmp_path / "two-fields.jsonl"
    path.write_text("\n".join(json.dumps({"a": f"alpha {i}", "b": f"beta {i}"}) for i in range(20)))
    a = local_dm(tmp_path, tok, train=str(path), text_field="a")
    b = local_dm(tmp_path, tok, train=str(path), text_field="b")
    assert split_documents(a) == [f"alpha {i}" for i in range(20)]
    assert split_documents(b) == [f"beta {i}" for i in range(20)]


def test_token_cache_follows_a_replaced_tokenizer_file(tmp_path):
    """Overwriting a given tokenizer model file invalidates the tokens cached with the old one."""
    corpus = read_corpus("test").splitlines()
    model = tmp_path / "user.model"
    Tokenizer.train(iter(corpus[:2000]), model, vocab_size=320)
    (tmp_path / "a.txt").write_text("\n".join(corpus[:200]), encoding="utf-8")
    first = local_dm(tmp_path, train=str(tmp_path / "a.txt"), tokenizer=str(model))
    Tokenizer.train(iter(corpus[:2000]), model, vocab_size=480)
    second = local_dm(tmp_path, train=str(tmp_path / "a.txt"), tokenizer=str(model))
    assert second.tokenizer.vocab_size == 480
    assert second.tokens["train"].tolist() == encode_document(Tokenizer(model), (tmp_path / "a.txt").read_text())
    assert len(second.tokens["train"]) < len(first.tokens["train"])


# --- documents ------------------------------------------------------------------------------------------------


def numbered_docs(n: int) -> list[str]:
    """n distinct documents, each naming its own number several times."""
    return [f"Document {i}: " + f"word{i} " * (3 + i % 5) + "\n" for i in range(n)]


# --- `datasets` sources ---------------------------------------------------------------------------------------


def test_hf_dataset_saved_to_disk(tmp_path, tok, hf_offline):
    """A DatasetDict written by save_to_disk loads all three splits, from the chosen text column."""
    datasets = hf_offline
    rows = {
        split: [f"{split} row {i}.\nSecond line of {split} {i}." for i in range(12)]
        for split in ("train", "validation", "test")
    }
    dd = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict({"content": r, "other": [0] * len(r)}) for split, r in rows.items()}
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    dm = local_dm(tmp_path, tok, train=None, hf_dataset=str(tmp_path / "ds"), text_field="content")
    assert split_documents(dm, "train") == rows["train"]
    assert split_documents(dm, "val") == rows["validation"]
    assert split_documents(dm, "test") == rows["test"]
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape == (2, 9)


def test_hf_dataset_without_the_text_column(tmp_path, tok, hf_offline):
    """A dataset without the text_field column is a UserInputError naming the column and the ones it has."""
    datasets = hf_offline
    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"body": ["some text"] * 4}) for s in ("train", "validation", "test")}
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserInputError, match=r"no string column 'text' \(columns: body;"):
        local_dm(tmp_path, tok, train=None, hf_dataset=str(tmp_path / "ds"))
    with pytest.raises(UserInputError, match=r"no string column 'text' \(columns: body;"):
        local_dm(tmp_path, None, train=None, hf_dataset=str(tmp_path / "ds"), vocab_size=300)


def test_hf_dataset_not_available_locally(tmp_path, hf_offline):
    """A dataset name that is not in the local cache says how to provide it offline."""
    dm = LMDataModule(hf_dataset="no-such-org/no_such_dataset_xyz", vocab_size=300, cache_dir=str(tmp_path))
    with pytest.raises(UserInputError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "no-such-org/no_such_dataset_xyz" in message and "not available locally" in message
    assert "save_to_disk" in message and "data.hf_dataset" in message


# --- bad input ------------------------------------------------------------------------------------------------


def write_bytes(path: Path, data: bytes) -> str:
    """Write data to path and return the path as a string, as the datamodule takes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def bad_spec(case: str, tmp_path: Path) -> str:
    """A training-data spec of the given kind of wrong, made under tmp_path."""
    if case == "missing":
        return str(tmp_path / "missing.txt")
    if case == "glob":
        return str(tmp_path / "nothing-*.txt")
    if case == "empty-dir":
        (tmp_path / "empty-dir").mkdir()
        (tmp_path / "empty-dir" / "readme.md").write_text("no text files here")
        return str(tmp_path / "empty-dir")
    name, data = {
        "empty": ("empty.txt", b""),
        "blank": ("blank.txt", b" \n\n \n"),
        "empty-gz": ("empty.txt.gz", gzip.compress(b"")),
        "not-gz": ("plain.jsonl.gz", b'{"text": "not compressed"}\n'),
        "csv": ("data.csv", b"text\nhello\n"),
    }[case]
    return write_bytes(tmp_path / name, data)


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "empty-gz", "not-gz", "csv", "glob", "empty-dir"])
def test_bad_files_name_the_offending_path(tmp_path, tok, case):
    """Each bad file spec is a UserInputError whose message names the file, directory or pattern."""
    spec = bad_spec(case, tmp_path)
    with pytest.raises(UserInputError, match=re.escape(spec)):
        local_dm(tmp_path, tok, train=spec)


def test_empty_gz_training_file_among_others(tmp_path):
    """An empty .txt.gz behind a good file, found while training the tokenizer, is reported as itself."""
    good = write_bytes(tmp_path / "a.txt", read_corpus("test")[:20_000].encode())
    empty = write_bytes(tmp_path / "b.txt.gz", gzip.compress(b""))
    with pytest.raises(UserInputError) as info:
        local_dm(tmp_path, train=[good, empty], vocab_size=320)
    assert str(info.value) == f"data file {empty!r} is empty"


@pytest.mark.parametrize("given_tokenizer", [False, True], ids=["training-tokenizer", "given-tokenizer"])
def test_invalid_utf8_writes_no_tokens(tmp_path, tok, given_tokenizer):
    """A training file with invalid UTF-8 (after a good file) is a one-line UserInputError naming it and the byte
    offset, and leaves nothing in the token cache."""
    good = write_bytes(tmp_path / "a.txt", read_corpus("test")[:20_000].encode())
    bad = write_bytes(tmp_path / "b.txt", b"fine line\n" * 10 + b"caf\xe9 in latin-1\n")
    with pytest.raises(UserInputError) as info:
        local_dm(tmp_path, tok if given_tokenizer else None, train=[good, bad], vocab_size=320)
    message = str(info.value)
    assert message == f"data file {bad!r} is not UTF-8 text (bad byte at offset 103)"
    tokens = tmp_path / "cache" / "tokens"
    assert not tokens.exists() or not any(tokens.iterdir())


def test_invalid_utf8_in_val_leaves_no_partial_file(tmp_path, tok):
    """Invalid UTF-8 in the validation split fails before any val token file (or temporary file) is written."""
    train = write_bytes(tmp_path / "train.txt", b"good training text\n")
    bad = write_bytes(tmp_path / "val.txt", b"\xff\xfe")
    with pytest.raises(UserInputError, match=re.escape(bad)):
        local_dm(tmp_path, tok, train=train, val=bad)
    written = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len(written) == 1 and written[0].startswith("train-") and written[0].endswith(".pt")


def test_invalid_utf8_offset_in_a_large_jsonl(tmp_path, tok):
    """The bad byte's offset is its offset in the file, also far beyond the first read chunk of a JSONL file."""
    data = b"".join(json.dumps({"text": f"line {i} " + "x" * 60}).encode() + b"\n" for i in range(400))
    bad_at = len(data) + len(b'{"text": "caf')
    data += b'{"text": "caf\xe9"}\n'
    assert bad_at > 16_384
    for name, payload in (("big.jsonl", data), ("big.jsonl.gz", gzip.compress(data))):
        path = write_bytes(tmp_path / name, payload)
        expected = f"data file {path!r} is not UTF-8 text (bad byte at offset {bad_at})"
        with pytest.raises(UserInputError, match=re.escape(expected)):
            local_dm(tmp_path, tok, train=path)


def test_jsonl_line_without_text_field(tmp_path, tok):
    """A JSONL record without text_field names the file, the line number and the field."""
    path = write_bytes(tmp_path / "c.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserInputError, match=re.escape(f"{path}:2: no 'text' field")):
        local_dm(tmp_path, tok, train=path)


def test_jsonl_text_field_that_is_not_a_string(tmp_path):
    """A JSONL record whose text_field is not a string is a UserInputError naming the file, line and field."""
    lines = [json.dumps({"text": line}) for line in read_corpus("test").splitlines()[:300] if line]
    path = write_bytes(tmp_path / "c.jsonl", ("\n".join(lines) + '\n{"text": null}\n').encode())
    expected = f"{path}:{len(lines) + 1}: the 'text' field is a NoneType, not a string"
    with pytest.raises(UserInputError, match=re.escape(expected)):
        local_dm(tmp_path, train=path, vocab_size=320)


def test_jsonl_line_that_is_not_json(tmp_path, tok):
    """A JSONL line that is not JSON names the file and line."""
    path = write_bytes(tmp_path / "c.jsonl", b'{"text": "ok"}\nnot json\n')
    with pytest.raises(UserInputError, match=re.escape(f"{path}:2: not valid JSON")):
        local_dm(tmp_path, tok, train=path)


@pytest.mark.parametrize("vocab_size", [0, 100, 259])
def test_vocab_size_too_small(tmp_path, vocab_size):
    """vocab_size below 260 (256 bytes + 4 specials) is refused up front, naming the value."""
    path = write_bytes(tmp_path / "a.txt", b"text\n")
    with pytest.raises(UserInputError, match=f"vocab_size={vocab_size}\\b"):
        LMDataModule(train=path, val=None, test=None, vocab_size=vocab_size, cache_dir=str(tmp_path))


def test_split_too_short_for_seq_len(tmp_path, tok):
    """A split with fewer than seq_len + 1 tokens is a UserInputError giving the numbers."""
    train = write_bytes(tmp_path / "train.txt", read_corpus("test")[:5000].encode())
    val = write_bytes(tmp_path / "val.txt", b"Too short.\n")
    dm = local_dm(tmp_path, tok, train=train, val=val, seq_len=64)
    n_val = len(dm.tokens["val"])
    assert n_val < 65
    assert len(dm.train_dataloader()) > 0
    with pytest.raises(UserInputError, match=re.escape(f"split has {n_val} tokens, fewer than seq_len + 1 = 65")):
        dm.val_dataloader()


# --- ResumableSampler ---------------------------------------------------------------------------------------------


def order(
    n: int, skip: int = 0, epoch: int = 0, seed: int = 7, replicas: int = 1, rank: int = 0, shuffle: bool = True
) -> list[int]:
    """The indices a ResumableSampler over range(n) yields in one epoch."""
    sampler = ResumableSampler(range(n), num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, skip=skip)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    assert len(indices) == n // replicas - skip
    return indices


@pytest.mark.parametrize("k", [0, 1, 3, 12])
def test_sampler_skip_yields_the_tail(k):
    """skip = k * batch drops exactly the first k batches of the epoch's order, once; its length stays the
    whole epoch's (Lightning counts the restored batches towards the epoch)."""
    batch, n = 4, 50
    full = order(n)
    sampler = ResumableSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=7, skip=k * batch)
    assert len(sampler) == n
    assert list(sampler) == full[k * batch :]
    assert list(sampler) == full, "only the resumed epoch starts late"


def test_sampler_order_depends_on_epoch_and_seed():
    """The order is a permutation fixed by (seed, epoch): same pair same order, other epoch or seed another."""
    n = 64
    assert sorted(order(n)) == list(range(n))
    assert order(n, epoch=3) == order(n, epoch=3)
    assert order(n, epoch=0) != order(n, epoch=1)
    assert order(n, seed=1) != order(n, seed=2)
    assert order(n, shuffle=False) == list(range(n))


@pytest.mark.parametrize("n", [40, 41])
def test_sampler_replicas_are_disjoint_and_cover(n):
    """Two replicas get disjoint, equally long index sets covering the dataset (the odd one out dropped)."""
    r0, r1 = order(n, replicas=2, rank=0, epoch=2), order(n, replicas=2, rank=1, epoch=2)
    assert len(r0) == len(r1) == n // 2
    assert not set(r0) & set(r1)
    assert len(set(r0) | set(r1)) == n - n % 2 and (set(r0) | set(r1)) <= set(range(n))
    assert order(n, replicas=2, rank=1, epoch=2, skip=5) == r1[5:]


# --- resuming under a Trainer -------------------------------------------------------------------------------------


def trainer_test(test):
    """Marks an end-to-end test under a Lightning Trainer: slow, and quiet about Lightning's own warnings."""
    marks = (
        pytest.mark.slow,
        pytest.mark.filterwarnings("ignore::UserWarning"),
        pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),
    )
    for mark in marks:
        test = mark(test)
    return test


class _Stop(Exception):
    """Stands for a crash after a checkpoint was saved."""


class _Recorder(L.LightningModule):
    """Records what `record(batch)` returns for every training batch, per epoch (by default the LM windows);
    learns nothing (lr 0), so runs differ only in their data."""

    def __init__(self, record=lambda batch: batch.tolist()) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.record, self.seen = record, {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(self.record(batch))
        return self.weight * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_and_resume(
    make_datamodule, tmp_path: Path, max_epochs: int, stop: str | None = None, record=None, check=None, **trainer_kwargs
) -> dict:
    """Train max_epochs on a fresh `make_datamodule()` with a _Recorder; with `stop`, crash there (_SaveAndStop)
    and resume from its checkpoint. Returns epoch -> the batches trained in it, both runs together. `check(trainer)`
    runs after each fit."""

    def run(module, callbacks=(), ckpt_path=None):
        trainer = L.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=list(callbacks),
            **trainer_kwargs,
        )
        trainer.fit(module, make_datamodule(), ckpt_path=ckpt_path)
        if check is not None:
            check(trainer)

    recorder = (lambda: _Recorder(record)) if record is not None else _Recorder
    first = recorder()
    if stop is None:
        run(first)
        return first.seen
    with pytest.raises(_Stop):
        run(first, [_SaveAndStop(stop, tmp_path / "stop.ckpt")])
    resumed = recorder()
    run(resumed, ckpt_path=tmp_path / "stop.ckpt")
    return {e: first.seen.get(e, []) + resumed.seen.get(e, []) for e in sorted({*first.seen, *resumed.seen})}


class _SaveAndStop(L.Callback):
    """Saves a checkpoint at batch 2 of epoch 1 ("batch") or at the end of epoch 0 ("epoch"), then crashes."""

    def __init__(self, where: str, path: Path) -> None:
        self.where, self.path = where, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "batch" and trainer.current_epoch == 1 and batch_idx == 2:
            trainer.save_checkpoint(self.path)
            raise _Stop

    def on_train_epoch_end(self, trainer, pl_module):
        if self.where == "epoch" and trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)
            raise _Stop


TEXT = "".join(f"line {i} of a small text\n" for i in range(40))


def batches_per_epoch(tok: Tokenizer) -> int:
    """Full batches of 2 windows of 16 + 1 tokens in TEXT."""
    return (len(encode_document(tok, TEXT)) - 1) // 16 // 2


def fit_windows(tmp_path: Path, tok: Tokenizer, stop: str | None = None, **trainer_kwargs) -> dict:
    """Train 3 epochs on TEXT in shuffled batches of 2 windows; with `stop`, crash there and resume from the
    checkpoint. Returns epoch -> the batches trained in it, both runs together."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "a.txt").write_text(TEXT)

    def datamodule():
        return LMDataModule(
            train=str(tmp_path / "a.txt"),
            val=None,
            test=None,
            tokenizer=str(tok.path),
            seq_len=16,
            batch_size=2,
            cache_dir=str(tmp_path / "cache"),
        )

    def check(trainer):
        assert trainer.num_training_batches == batches_per_epoch(tok)

    return fit_and_resume(datamodule, tmp_path, 3, stop, check=check, **trainer_kwargs)


@trainer_test
@pytest.mark.parametrize("stop", ["batch", "epoch"])
def test_resumed_run_sees_the_uninterrupted_batches(tmp_path, tok, monkeypatch, stop):
    """Resuming from a checkpoint saved mid-epoch (on_train_batch_end) or at an epoch's end trains exactly the
    batches, in the order, of an uninterrupted run: nothing repeated, nothing lost, later epochs whole."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    uninterrupted = fit_windows(tmp_path / "full", tok)
    assert batches_per_epoch(tok) >= 6
    assert [len(uninterrupted[e]) for e in (0, 1, 2)] == [batches_per_epoch(tok)] * 3
    assert uninterrupted[0] != uninterrupted[1], "each epoch has its own order"
    assert fit_windows(tmp_path / stop, tok, stop=stop) == uninterrupted


@trainer_test
def test_reloaded_train_loader_starts_each_epoch_whole(tmp_path, tok, monkeypatch):
    """With reload_dataloaders_every_n_epochs=1 the loader rebuilt at each epoch start skips nothing."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    seen = fit_windows(tmp_path, tok, reload_dataloaders_every_n_epochs=1)
    assert [len(seen[e]) for e in (0, 1, 2)] == [batches_per_epoch(tok)] * 3
