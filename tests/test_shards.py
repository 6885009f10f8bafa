"""Token shards: `lit_iiet.data.prepare` and ShardedLMDataModule (exact resume, disjoint ranks, bad folders)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_data import fit_and_resume, numbered_docs, read_corpus, trainer_test

from lit_iiet.analysis.logs import read_scalars
from lit_iiet.cli import main
from lit_iiet.data.lm import LMDataModule, ResumableSampler
from lit_iiet.data.prepare import main as prepare_main
from lit_iiet.data.prepare import prepare
from lit_iiet.data.shards import ShardedLMDataModule, TokenShards
from lit_iiet.data.tokenizer import Tokenizer
from lit_iiet.errors import UserInputError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Five JSONL files of numbered documents and a text file per held-out split."""
    root = tmp_path_factory.mktemp("corpus")
    docs = numbered_docs(200)
    for f in range(5):
        (root / "train").mkdir(exist_ok=True)
        (root / "train" / f"part{f}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[f::5]))
    (root / "val.txt").write_text(read_corpus("valid")[:20000])
    (root / "test.txt").write_text(read_corpus("test")[:20000])
    return root


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    prepare(
        str(out),
        train=str(corpus / "train"),
        val=str(corpus / "val.txt"),
        test=str(corpus / "test.txt"),
        vocab_size=300,
        workers=1,
    )
    return out


def test_shards_hold_the_in_memory_token_stream(shards, corpus, tmp_path):
    """Every split read from its shards (one file per corpus file, windows across file ends) is the stream that
    LMDataModule tokenizes into memory from the same text and tokenizer; the files are plain .npy arrays."""
    dm = LMDataModule(
        train=str(corpus / "train"),
        val=str(corpus / "val.txt"),
        test=str(corpus / "test.txt"),
        tokenizer=str(shards / "tokenizer.model"),
        seq_len=16,
        batch_size=2,
        cache_dir=str(tmp_path),
    )
    dm.prepare_data()
    dm.setup()
    sharded = ShardedLMDataModule(str(shards), seq_len=16, batch_size=2, num_workers=0)
    assert len(sharded.manifest["splits"]["train"]["files"]) == 5
    for split in ("train", "val", "test"):
        stream = sharded.token_stream(split)
        assert torch.equal(stream[0 : len(stream)], dm.tokens[split].long())
    first = np.load(shards / "train" / "00000.npy", mmap_mode="r")
    assert first.dtype == np.uint16 and first.tolist() == dm.tokens["train"][: len(first)].tolist()
    for split in ("train", "val"):
        assert [b.tolist() for b in dm._loader(split)] == [b.tolist() for b in sharded._loader(split)]


def test_shards_do_not_depend_on_the_number_of_workers(shards, corpus, tmp_path):
    """Two worker processes write byte-identical files and the same counts as one."""
    out = tmp_path / "two"
    prepare_main(
        [
            str(out),
            "--train",
            str(corpus / "train"),
            "--val",
            str(corpus / "val.txt"),
            "--tokenizer",
            str(shards / "tokenizer.model"),
            "--workers",
            "2",
        ]
    )
    one, two = (json.loads((d / "manifest.json").read_text()) for d in (shards, out))
    assert one["splits"]["train"] == two["splits"]["train"] and one["splits"]["val"] == two["splits"]["val"]
    for part in one["splits"]["train"]["files"]:
        assert (shards / part["path"]).read_bytes() == (out / part["path"]).read_bytes()


def test_token_shards_pickle_without_their_data(shards):
    """DataLoader workers receive the file list, not a copy of the mapped tokens."""
    stream = ShardedLMDataModule(str(shards), seq_len=16).token_stream("train")
    stream[0:10]  # maps the files
    copy = pickle.loads(pickle.dumps(stream))
    assert len(pickle.dumps(stream)) < 2000 and torch.equal(copy[5:500], stream[5:500])


# --- the block-shuffled sampler ------------------------------------------------------------------------------


def sampler_order(n, block, replicas=1, rank=0, epoch=0, skip=0):
    sampler = ResumableSampler(range(n), num_replicas=replicas, rank=rank, shuffle=True, seed=3, skip=skip, block=block)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n", [37, 100])
def test_block_shuffle_is_a_permutation_with_exact_skips(n):
    """Over several blocks the order is a permutation, changes with the epoch, and a skip jumps to its tail."""
    full = sampler_order(n, block=8)
    assert sorted(full) == list(range(n)) and full != list(range(n))
    assert sampler_order(n, block=8, epoch=1) != full
    for k in (1, 7, 8, 9, n - 1):
        assert sampler_order(n, block=8, skip=k) == full[k:]


@pytest.mark.parametrize("n", [41, 64])
def test_block_shuffle_deals_disjoint_ranks(n):
    """Two ranks get disjoint halves of one epoch order (rank r: positions r, r+2, ...), also after a skip."""
    full = sampler_order(n, block=8)[: n - n % 2]
    r0, r1 = sampler_order(n, 8, replicas=2, rank=0), sampler_order(n, 8, replicas=2, rank=1)
    assert r0 == full[0::2] and r1 == full[1::2] and not set(r0) & set(r1)
    assert sampler_order(n, 8, replicas=2, rank=1, skip=5) == r1[5:]


def test_one_block_is_the_distributed_samplers_order():
    """Up to one block the order is DistributedSampler's, so runs on in-memory data keep their old batches."""
    from torch.utils.data import DistributedSampler

    reference = DistributedSampler(range(50), num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    reference.set_epoch(4)
    assert sampler_order(50, block=50, replicas=2, rank=1, epoch=4) == list(reference)


# --- resuming under a Trainer -------------------------------------------------------------------------------------


def fit_shard_windows(tmp_path: Path, shards: Path, stop: str | None = None) -> dict:
    """Train 2 epochs over the shards with shuffle blocks of 4 windows; with `stop`, crash and resume."""

    def datamodule():
        return ShardedLMDataModule(str(shards), seq_len=16, batch_size=2, num_workers=0, shuffle_block=4)

    return fit_and_resume(datamodule, tmp_path, 2, stop)


@trainer_test
def test_resume_from_shards_sees_the_uninterrupted_batches(tmp_path, shards, monkeypatch):
    """A run resumed from a checkpoint saved mid-epoch trains exactly the uninterrupted run's batches."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    uninterrupted = fit_shard_windows(tmp_path / "full", shards)
    assert len(uninterrupted[1]) > 8 and uninterrupted[0] != uninterrupted[1]
    assert fit_shard_windows(tmp_path / "stop", shards, stop="batch") == uninterrupted


@pytest.mark.slow
def test_two_process_ddp_resumes_from_shards_exactly(tmp_path, shards):
    """A 6-step run on one process (batch 4) saves a checkpoint at step 3; `fit --data ShardedLMDataModule` on 2
    gloo processes (batch 2 each) resumes from it and trains steps 4-6 on exactly the uninterrupted run's
    windows: rank r takes positions r, r + 2, ... of the same order, so the losses and the final weights match
    the single process's (up to float reduction order; other windows would change them by far more)."""
    args = (
        "--config conf/lm/shakespeare.yaml --model.arch.n_layers 2 --model.arch.d_model 32 --model.arch.n_heads 2 "
        "--model.arch.vocab_size 320 --model.val_sample_prompt null --data lit_iiet.data.ShardedLMDataModule "
        "--data.seq_len 16 --data.num_workers 0 --data.shuffle_block 8 --trainer.max_steps 6 "
        "--trainer.val_check_interval 3 --trainer.limit_val_batches 2 --trainer.log_every_n_steps 1 "
        "--trainer.enable_progress_bar false --checkpoint.save_top_k -1 --checkpoint.monitor null "
        "--checkpoint.filename {step}"
    ).split() + ["--data.path", str(shards)]
    main(["fit", *args, "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "one")])
    cmd = [
        sys.executable,
        "-m",
        "lit_iiet",
        "fit",
        *args,
        "--config",
        "conf/trainer/ddp_cpu.yaml",
        "--data.batch_size",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "ddp"),
        "--ckpt_path",
        str(tmp_path / "one/checkpoints/step=3.ckpt"),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, ddp = read_scalars(tmp_path / "one")["train/loss"], read_scalars(tmp_path / "ddp")["train/loss"]
    assert [s for s, _ in ddp] == [s for s, _ in one][3:]
    for (_, a), (_, b) in zip(one[3:], ddp):
        assert abs(a - b) < 1e-4, (one, ddp)
    a = torch.load(tmp_path / "one/checkpoints/step=6.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ddp/checkpoints/step=6.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_shard_folders_get_one_line_errors(shards, tmp_path):
    def error(path, **kwargs) -> str:
        with pytest.raises(UserInputError) as info:
            ShardedLMDataModule(str(path), **kwargs).setup("fit")  # the folder is read when a stage needs it
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "does not exist" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "is empty" in error(tmp_path / "empty")
    half = tmp_path / "half"
    shutil.copytree(shards, half)
    (half / "manifest.json").unlink()
    assert "prepare did not finish" in error(half)
    cut = tmp_path / "cut"
    shutil.copytree(shards, cut)
    with open(cut / "train" / "00002.npy", "r+b") as f:
        f.truncate(200)
    assert "00002.npy" in error(cut) and "changed after prepare" in error(cut)
    other = Tokenizer.train(iter(numbered_docs(50)), tmp_path / "other.model", vocab_size=300)
    message = error(shards, tokenizer=str(other.path))
    assert "other.model" in message and "not the one the shards" in message
    ShardedLMDataModule(str(shards), tokenizer=str(shards / "tokenizer.model")).setup("fit")  # its own is fine
    # predict continues prompts: with the checkpoint's tokenizer it needs no folder at all
    alone = ShardedLMDataModule(str(tmp_path / "missing"), tokenizer=str(other.path))
    alone.setup("predict")
    assert alone.tokenizer.model_proto == other.model_proto


def test_prepare_never_writes_into_a_used_folder(shards, corpus):
    before = {p: p.stat().st_mtime_ns for p in shards.rglob("*")}
    with pytest.raises(UserInputError, match="holds a prepare with other settings: source.val is "):
        prepare(str(shards), train=str(corpus / "train"), vocab_size=300)
    assert {p: p.stat().st_mtime_ns for p in shards.rglob("*")} == before


def test_token_shards_slice_across_files(tmp_path):
    """A window spanning the end of one file and the start of the next reads both."""
    files = []
    for i, values in enumerate(([1, 2, 3], [4], [5, 6, 7, 8])):
        np.array(values, dtype=np.uint16).tofile(tmp_path / f"{i}.bin")
        files.append((tmp_path / f"{i}.bin", 0, len(values)))
    stream = TokenShards(files, "uint16")
    assert len(stream) == 8 and stream[2:6].tolist() == [3, 4, 5, 6] and stream[0:8].tolist() == list(range(1, 9))


def test_prepare_from_a_saved_dataset(tmp_path, hf_offline):
    """A `datasets` copy on disk is cut into row ranges; the shards hold the in-memory stream of the same rows."""
    datasets = hf_offline
    rows = {s: [f"{s} row {i}.\nSecond line {i}." for i in range(40)] for s in ("train", "validation")}
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": r}) for s, r in rows.items()}).save_to_disk(
        str(tmp_path / "ds")
    )
    tok = Tokenizer.train(iter(numbered_docs(60)), tmp_path / "tok.model", vocab_size=300)
    prepare(str(tmp_path / "out"), hf_dataset=str(tmp_path / "ds"), tokenizer=str(tok.path), workers=2)
    sharded = ShardedLMDataModule(str(tmp_path / "out"), seq_len=8)
    dm = LMDataModule(
        train=None,
        hf_dataset=str(tmp_path / "ds"),
        tokenizer=str(tok.path),
        seq_len=8,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup()
    for split in ("train", "val"):
        stream = sharded.token_stream(split)
        assert torch.equal(stream[0 : len(stream)], dm.tokens[split].long())
    assert sharded.manifest["splits"]["train"]["documents"] == 40 and not sharded.has_split("test")
