"""Hugging Face tokenizer.json models wherever SentencePiece ones work (training, shards, checkpoints, predict,
lm-eval, Llama export), and a checkpoint that predicts alone: no corpus, no cache."""

import gzip
import hashlib
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from tokenizers import Tokenizer as HFModel
from tokenizers import decoders, models, pre_tokenizers, trainers

from lit_iiet.checkpoint import TOKENIZER_KEY
from lit_iiet.cli import main
from lit_iiet.data import SummarizationDataModule, Tokenizer
from lit_iiet.data.prepare import prepare
from lit_iiet.data.shards import ShardedLMDataModule
from lit_iiet.data.tokenizer import HFTokenizer
from lit_iiet.errors import UserInputError
from lit_iiet.eval_harness import LitIIETLM
from lit_iiet.hf_llama import export_llama, import_llama
from lit_iiet.nn.ode import ODEConfig

# Euler (so that it exports to Llama), greedy prediction (so that two runs give the same text).
GREEDY = ["--model.sampling.temperature", "0", "--data.prompts", '["ROMEO:"]']
RUN = [*TINY, "--model.ode.scheme", "euler", "--model.ode.iters", "1", *GREEDY]


def shakespeare(split: str) -> str:
    with gzip.open(ROOT / f"data/shakespeare/{split}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


def train_bpe(path, special_tokens: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer.json, as GPT-2 / Llama 3 / Qwen ship them, trained offline on shipped text."""
    model = HFModel(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(shakespeare("valid").splitlines(keepends=True), trainer)
    model.save(str(path))  # pretty-printed, as published files are
    return path


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> HFTokenizer:
    return Tokenizer(train_bpe(tmp_path_factory.mktemp("hf_tok") / "tokenizer.json", ["<|endoftext|>"]))


@pytest.fixture(scope="module")
def run(tokenizer_json, tmp_path_factory) -> SimpleNamespace:
    """5 CLI steps with the tokenizer.json, and the greedy prediction of the checkpoint. A part of the shipped
    corpus is enough (and a tenth of the time: a .txt file is one document, encoded in one piece)."""
    root = tmp_path_factory.mktemp("json_run")
    for split, chars in (("train", 100_000), ("valid", 20_000)):
        (root / f"{split}.txt").write_text(shakespeare(split)[:chars], encoding="utf-8")
    common = ["--data.tokenizer", str(tokenizer_json.path), "--trainer.default_root_dir", str(root)]
    data = ["--data.train", str(root / "train.txt"), "--data.val", str(root / "valid.txt"), "--data.test", "null"]
    main(["fit", *RUN, *common, *data, "--trainer.max_steps", "5"])
    ckpt = root / "checkpoints" / "last.ckpt"
    main(["predict", *RUN, *common, "--ckpt_path", str(ckpt)])
    return SimpleNamespace(root=root, ckpt=ckpt, text=(root / "predictions.txt").read_text())


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Another machine: an empty cache; the checkpoint is copied to a new folder by the test."""
    monkeypatch.setenv("LIT_IIET_CACHE", str(tmp_path / "empty_cache"))
    return tmp_path


def test_tokenizer_json_loads_as_a_tokenizer(tokenizer_json):
    tok = tokenizer_json
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400
    assert tok.eos_id == tok.bos_id == tok.pad_id == 0  # GPT-2 style: <|endoftext|> is all three
    text = shakespeare("test")[:3000] + "\n\n  naïve — 𝄞\n"
    ids = tok.encode_document(text)
    assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1] and tok.decode(ids) == text
    # Compared as models: the compact serialization the checkpoint stores reads back as the same model.
    assert Tokenizer.from_model_proto(tok.model_proto, tok.path.parent / "cache").model_proto == tok.model_proto


def test_a_tokenizer_json_without_an_end_of_text_token_is_refused(tmp_path):
    path = train_bpe(tmp_path / "tokenizer.json", ["<unk>"], vocab_size=300)
    with pytest.raises(UserInputError) as info:
        Tokenizer(path)
    assert str(info.value) == (
        f"tokenizer {str(path)!r} has no end-of-text token (looked for </s>, <|endoftext|>, <|end_of_text|>, <eos>); "
        "documents are separated by it"
    )


def test_train_with_a_tokenizer_json_and_predict_from_the_moved_checkpoint(run, tokenizer_json, elsewhere):
    assert torch.load(run.ckpt, weights_only=True)[TOKENIZER_KEY] == tokenizer_json.model_proto
    assert run.text.startswith("ROMEO:") and len(run.text) > len("ROMEO:\n")
    moved = elsewhere / "moved" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(run.ckpt, moved)
    out = elsewhere / "out"
    # No data.tokenizer, no training text: the checkpoint's tokenizer.json is restored into the empty cache.
    main(["predict", *RUN, "--ckpt_path", str(moved), "--data.train", "null", "--trainer.default_root_dir", str(out)])
    assert (out / "predictions.txt").read_text() == run.text
    digest = hashlib.sha256(tokenizer_json.model_proto).hexdigest()[:16]
    assert [p.name for p in (elsewhere / "empty_cache" / "tokenizers").iterdir()] == [f"hf-{digest}.json"]
    # lm-eval and the Llama export need the checkpoint only; the export writes tokenizer.json, which imports back.
    lm = LitIIETLM(checkpoint=moved, device="cpu")
    assert isinstance(lm.tokenizer, HFTokenizer) and lm.eot_token_id == tokenizer_json.eos_id
    assert lm.tok_encode("ROMEO:\nSoft!") == tokenizer_json.encode("ROMEO:\nSoft!")
    export_llama(moved, elsewhere / "hf")
    assert not (elsewhere / "hf" / "tokenizer.model").exists()
    assert Tokenizer(elsewhere / "hf" / "tokenizer.json").model_proto == tokenizer_json.model_proto
    back = import_llama(elsewhere / "hf", elsewhere / "back", ode=ODEConfig("euler", 1))
    assert torch.load(back, weights_only=True)[TOKENIZER_KEY] == tokenizer_json.model_proto


def test_prepare_with_a_tokenizer_json_writes_shards_that_the_sharded_module_reads(tokenizer_json, tmp_path):
    texts = {"train": shakespeare("valid")[:50_000], "val": shakespeare("test")[:10_000]}
    for split, text in texts.items():
        (tmp_path / f"{split}.txt").write_text(text, encoding="utf-8")
    files = {split: str(tmp_path / f"{split}.txt") for split in texts}
    prepare(str(tmp_path / "shards"), **files, tokenizer=str(tokenizer_json.path))
    dm = ShardedLMDataModule(str(tmp_path / "shards"), seq_len=16, num_workers=0, tokenizer=str(tokenizer_json.path))
    dm.setup("fit")
    assert isinstance(dm.tokenizer, HFTokenizer) and dm.tokenizer.model_proto == tokenizer_json.model_proto
    for split, text in texts.items():
        stream = dm.token_stream(split)
        assert stream[0 : len(stream)].tolist() == tokenizer_json.encode_document(text)
    assert dm.manifest["dtype"] == np.dtype(np.uint16).name and next(iter(dm.train_dataloader())).shape == (8, 17)


def test_predict_needs_only_the_checkpoint(run, tmp_path, monkeypatch):
    """A copy of the repository with conf/ and the checkpoint only: no data/, an empty cache."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "conf", repo / "conf")
    shutil.copy(run.ckpt, repo / "model.ckpt")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("LIT_IIET_CACHE", str(tmp_path / "empty_cache"))
    assert not (repo / "data").exists()
    args = [
        "--config",
        "conf/lm/shakespeare.yaml",
        "--config",
        "conf/scheme/euler.yaml",
        "--ckpt_path",
        "model.ckpt",
        "--trainer.default_root_dir",
        "out",
    ]
    main(["predict", *args, "--model.sampling.max_new_tokens", "8", *GREEDY])
    assert (repo / "out" / "predictions.txt").read_text() == run.text


def test_seq2seq_predict_reads_no_split_files_and_needs_distinct_specials(tokenizer_json, tmp_path):
    sources = tmp_path / "papers.txt"
    sources.write_text("A paper.\n", encoding="utf-8")
    missing = str(tmp_path / "missing.jsonl")  # built without error: predict never reads the splits
    dm = SummarizationDataModule(
        train=missing, val=missing, test=missing, tokenizer=str(tokenizer_json.path), predict=str(sources)
    )
    # <|endoftext|> is eos, bos and pad of this tokenizer: targets could neither start nor end distinctly.
    with pytest.raises(UserInputError, match="has no distinct <pad>, <bos> and <eos>"):
        dm.setup("predict")
