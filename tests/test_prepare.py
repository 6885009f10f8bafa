"""`python -m lit_iiet.data.prepare` at scale: .jsonl.zst and parquet input, --max_tokens caps, resuming after
kill -9, refusing another command's folder, the progress line."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_data import numbered_docs, read_corpus

from lit_iiet.data import prepare as prepare_module
from lit_iiet.data.lm import TextCorpus
from lit_iiet.data.prepare import Pieces, Progress, prepare
from lit_iiet.data.prepare import main as prepare_main
from lit_iiet.data.tokenizer import Tokenizer
from lit_iiet.errors import UserInputError

FILES = 5
DOCS = numbered_docs(200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The same five training files as .jsonl, .jsonl.zst and .parquet, a validation text, and a tokenizer."""
    root = tmp_path_factory.mktemp("prepare_corpus")
    for kind in ("jsonl", "zst", "parquet"):
        (root / kind).mkdir()
    for f in range(FILES):
        docs = DOCS[f::FILES]
        jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
        (root / "jsonl" / f"part{f}.jsonl").write_bytes(jsonl)
        # Two frames per file, as written by streaming compressors: both must be read.
        half = len(jsonl) // 2
        frames = [zstandard.ZstdCompressor().compress(b) for b in (jsonl[:half], jsonl[half:])]
        (root / "zst" / f"part{f}.jsonl.zst").write_bytes(b"".join(frames))
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, root / "parquet" / f"part{f}.parquet", row_group_size=3)
    (root / "val.txt").write_text(read_corpus("valid")[:3000])
    Tokenizer.train(iter(numbered_docs(60)), root / "tok.model", vocab_size=300)
    return root


def run(out: Path, corpus: Path, *extra: str, kind: str = "jsonl", workers: int = 1) -> dict:
    args = [str(out), "--train", str(corpus / kind), "--val", str(corpus / "val.txt")]
    prepare_main([*args, "--tokenizer", str(corpus / "tok.model"), "--workers", str(workers), *extra])
    return json.loads((out / "manifest.json").read_text())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stream(folder: Path, split: str) -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text())
    return np.concatenate([np.load(folder / p["path"]) for p in manifest["splits"][split]["files"]])


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uncapped shards of the JSONL files."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run(out, corpus)
    return out


@pytest.mark.parametrize("kind", ["zst", "parquet"])
def test_zst_and_parquet_give_the_jsonl_shards(corpus, reference, tmp_path, kind, capsys):
    """The same documents as .jsonl.zst (two frames) or .parquet (several row groups) make the same shard files.
    A run of under PROGRESS_SECONDS prints one progress line, its last."""
    manifest = run(tmp_path / kind, corpus, kind=kind)
    assert len(re.findall(r"^prepare: 6/6 pieces, .* tokens/s, ETA ", capsys.readouterr().err, re.M)) == 1
    expected = json.loads((reference / "manifest.json").read_text())
    assert manifest["splits"] == expected["splits"] and manifest["splits"]["train"]["documents"] == len(DOCS)
    for part in expected["splits"]["train"]["files"]:
        assert (tmp_path / kind / part["path"]).read_bytes() == (reference / part["path"]).read_bytes()
    # LMDataModule reads its files through the same TextCorpus
    documents = [list(TextCorpus(str(corpus / k), None, None).documents("train")) for k in (kind, "jsonl")]
    assert documents[0] == documents[1] and len(documents[0]) == len(DOCS)


def test_max_tokens_keeps_the_first_tokens_whatever_the_workers(corpus, reference, tmp_path, monkeypatch):
    """--max_tokens keeps exactly the first N training tokens (the last kept file cut mid-way), deletes the
    pieces tokenized in vain, and writes the same bytes with 1 and 2 workers; the manifest records the caps."""
    sizes = [p["tokens"] for p in json.loads((reference / "manifest.json").read_text())["splits"]["train"]["files"]]
    cap = sizes[0] + sizes[1] + 17  # inside the third file
    caps = ["--max_tokens", f"{cap}", "--max_val_tokens", "1e2"]
    one = run(tmp_path / "one", corpus, *caps)
    run(tmp_path / "two", corpus, *caps, workers=2)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    # With no estimate of a piece's tokens every piece is handed out at once: those past the cap are tokenized in
    # vain and deleted, and the result stays the same.
    monkeypatch.setattr(Pieces, "mean_tokens", lambda self, split: None)
    run(tmp_path / "eager", corpus, *caps, workers=2)
    assert folder_bytes(tmp_path / "eager") == folder_bytes(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one" / "train").iterdir()) == ["00000.npy", "00001.npy", "00002.npy"]
    assert one["recipe"]["max_tokens"] == {"train": cap, "val": 100}
    assert one["splits"]["train"]["tokens"] == cap and one["splits"]["val"]["tokens"] == 100
    for split, n in (("train", cap), ("val", 100)):
        assert stream(tmp_path / "one", split).tolist() == stream(reference, split)[:n].tolist()
    # the documents of the kept prefix, the last one cut short
    assert one["splits"]["train"]["documents"] == int(np.sum(stream(reference, "train")[:cap] == 3)) + 1


def test_bad_caps_get_one_line_errors(corpus, tmp_path):
    for option, value, message in (
        ("max_tokens", 0, "max_tokens=0 must be a whole number of tokens >= 1"),
        ("max_tokens", 1.5, "max_tokens=1.5 must be a whole number"),
        ("max_test_tokens", 10, "max_test_tokens is set but there is no test data"),
    ):
        with pytest.raises(UserInputError, match=re.escape(message)):
            prepare(
                str(tmp_path / "out"),
                train=str(corpus / "jsonl"),
                tokenizer=str(corpus / "tok.model"),
                **{option: value},
            )
    assert not (tmp_path / "out").exists()


def killed_after(documents: int, out: Path, corpus: Path, args: list[str]) -> None:
    """Run the prepare in a forked process that kills itself (SIGKILL, no clean-up) while encoding document
    `documents` + 1."""

    def child() -> None:
        encode, seen = prepare_module.encode_document, [0]

        def encode_then_die(tokenizer, text):
            seen[0] += 1
            if seen[0] > documents:
                os.kill(os.getpid(), signal.SIGKILL)
            return encode(tokenizer, text)

        prepare_module.encode_document = encode_then_die
        run(out, corpus, *args)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL


def test_a_killed_prepare_resumes_to_the_uninterrupted_result(corpus, reference, tmp_path, capsys):
    """kill -9 in the middle of the second file: the rerun of the same command (with another number of workers)
    keeps the finished first file and writes the folder an uninterrupted prepare writes, byte for byte; a
    different command is refused first, with one line naming the difference, and changes nothing."""
    sizes = [p["tokens"] for p in json.loads((reference / "manifest.json").read_text())["splits"]["train"]["files"]]
    cap = sizes[0] + sizes[1] + 17  # inside the third file: the cut is redone too
    caps = ["--max_tokens", str(cap)]
    run(tmp_path / "full", corpus, *caps)
    out = tmp_path / "killed"
    killed_after(len(DOCS) // FILES + 5, out, corpus, caps)
    assert not (out / "manifest.json").exists() and (out / "train" / "00000.npy").is_file()
    assert list((out / "train").glob("00001.tmp*")), "the second file was being written"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(out, corpus, "--max_tokens", str(cap + 1))
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"max_tokens.train is {cap} there, {cap + 1} now" in error, error
    with pytest.raises(SystemExit):
        prepare_main(
            [str(out), "--train", str(corpus / "jsonl"), "--val", str(corpus / "val.txt"), "--vocab_size", "300"]
        )
    assert "tokenizer.sha256" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    run(out, corpus, *caps, workers=2)
    assert "resuming: 1 pieces" in capsys.readouterr().err
    assert (out / "train" / "00000.npy").stat().st_mtime_ns == before[out / "train" / "00000.npy"]  # kept
    assert folder_bytes(out) == folder_bytes(tmp_path / "full")
    run(out, corpus, *caps)  # a finished folder: the same command is a no-op
    assert "nothing to do" in capsys.readouterr().err and folder_bytes(out) == folder_bytes(tmp_path / "full")


def test_prepare_refuses_a_finished_or_foreign_folder(corpus, reference, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    with pytest.raises(UserInputError, match=r"holds a prepare with other settings: tokenizer\.sha256 is '[0-9a-f]"):
        prepare(str(reference), train=str(corpus / "jsonl"), val=str(corpus / "val.txt"), vocab_size=300)
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="neither empty nor a prepare's folder"):
        prepare(str(tmp_path), train=str(corpus / "jsonl"), tokenizer=str(corpus / "tok.model"))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_progress_line_estimates_the_time_left():
    """tokens/s from this run's counter; the ETA from the tokens expected (all pieces, or the cap) and left."""

    class Counter:
        value = 200

    for caps, pieces, eta in (({"train": None}, "2/10", "ETA 0m08s"), ({"train": 300}, "2/3", "ETA 0m01s")):
        done = {("train", i): {"split": "train", "index": i, "tokens": 100} for i in range(2)}
        progress = Progress(Pieces({"train": 10}, caps, done), Counter(), earlier_tokens=0)
        progress.start = time.perf_counter() - 2.0  # 100 tokens/s
        line = progress.line()
        assert line.startswith(f"prepare: {pieces} pieces, 200 tokens, 100 tokens/s, ") and line.endswith(eta), line


def test_bad_zst_and_parquet_files_get_one_line_errors(corpus, tmp_path):
    """Each names the file and what is wrong with it."""
    not_zst = tmp_path / "plain.jsonl.zst"
    not_zst.write_bytes(b'{"text": "not compressed"}\n')
    not_parquet = tmp_path / "data.parquet"
    not_parquet.write_bytes(b"not parquet")
    no_column = tmp_path / "content.parquet"
    pq.write_table(pa.table({"content": ["a document"]}), no_column)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a document", None]}), nulls)
    for i, (path, message) in enumerate(
        (
            (not_zst, "is not a readable Zstandard file"),
            (not_parquet, "is not a readable parquet file"),
            (no_column, "no 'text' column (columns: content; set data.text_field)"),
            (numbers, "the 'text' column holds int64, not strings"),
            (nulls, "row 2 has no 'text' value (null)"),
        )
    ):
        with pytest.raises(UserInputError) as info:
            prepare(str(tmp_path / f"out{i}"), train=str(path), tokenizer=str(corpus / "tok.model"))
        assert str(path) in str(info.value) and message in str(info.value) and "\n" not in str(info.value)


def test_a_changed_source_file_is_named(corpus, tmp_path):
    """A source file touched since the unfinished prepare began is named in the refusal."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a document"}) + "\n")
    (tmp_path / "out").mkdir()
    recipe = {"source": {"train": [{"path": str(data.resolve()), "bytes": data.stat().st_size, "mtime_ns": 1}]}}
    (tmp_path / "out" / "prepare.json").write_text(json.dumps(recipe))
    with pytest.raises(UserInputError, match=r"source\.train\[0\]\.mtime_ns is 1 there, \d+ now"):
        prepare(str(tmp_path / "out"), train=str(data), tokenizer=str(corpus / "tok.model"))
