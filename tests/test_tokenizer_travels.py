"""The tokenizer travels with every checkpoint (TOKENIZER_KEY), and documents are encoded as a whole.

A checkpoint copied elsewhere validates, predicts, scores with lm-eval and exports with its own tokenizer; a
different one is refused; checkpoints without one behave as before. Encoding equals SentencePiece's own
encoding of the whole text, also for a Llama-style model with a dummy prefix."""

import contextlib
import gzip
import hashlib
import io
import re
import shutil
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
from conftest import ROOT, TINY

from lit_iiet.checkpoint import TOKENIZER_KEY, checkpoint_tokenizer, load_checkpoint
from lit_iiet.cli import main
from lit_iiet.data import LMDataModule, Tokenizer
from lit_iiet.data.lm import encode_document
from lit_iiet.errors import UserInputError
from lit_iiet.eval_harness import LitIIETLM
from lit_iiet.hf_llama import export_llama, import_llama
from lit_iiet.nn.ode import ODEConfig

# Euler (so that it exports to Llama), greedy prediction (so that two runs give the same text).
RUN = [
    *TINY,
    "--model.ode.scheme",
    "euler",
    "--model.ode.iters",
    "1",
    "--model.sampling.temperature",
    "0",
    "--data.prompts",
    '["ROMEO:"]',
]


def shakespeare(split: str) -> str:
    with gzip.open(ROOT / f"data/shakespeare/{split}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """A tiny CLI fit on the shipped corpus, its validate loss and greedy prediction, and the tokenizer it used."""
    root = tmp_path_factory.mktemp("run")
    main(["fit", *RUN, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root)])
    ckpt = root / "checkpoints" / "last.ckpt"
    common = ["--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(root)]
    loss, text = validate_loss(*common), predict(root, *common)
    # The run trained its own tokenizer into the session's cache, keyed on these data settings.
    tokenizer = Tokenizer(LMDataModule(vocab_size=512).tokenizer_path())
    return SimpleNamespace(root=root, ckpt=ckpt, tokenizer=tokenizer, loss=loss, text=text)


def validate_loss(*args) -> float:
    """val/loss as `validate` prints it."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["validate", *RUN, *args])
    return float(re.search(r"val/loss\s*│\s*([0-9.]+)", out.getvalue()).group(1))


def predict(root, *args) -> str:
    main(["predict", *RUN, "--trainer.default_root_dir", str(root), *args])
    return (root / "predictions.txt").read_text()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Another machine: an empty cache; the checkpoint is copied to a new folder by the test."""
    monkeypatch.setenv("LIT_IIET_CACHE", str(tmp_path / "empty_cache"))
    return tmp_path


def trained_elsewhere(tmp_path) -> Tokenizer:
    """A different tokenizer of the same kind and size (our training options, 512 pieces) on other text."""
    lines = [line for line in shakespeare("test").splitlines()[:3000] if line.strip()]
    return Tokenizer.train(iter(lines), tmp_path / "other.model", vocab_size=512)


def test_every_checkpoint_carries_the_tokenizer_of_the_run(run):
    paths = sorted((run.root / "checkpoints").glob("*.ckpt"))
    assert len(paths) == 2  # best and last
    for path in paths:
        proto = torch.load(path, weights_only=True)[TOKENIZER_KEY]
        assert isinstance(proto, bytes) and proto == run.tokenizer.model_proto
    assert run.tokenizer.vocab_size == 512


def test_a_moved_checkpoint_validates_and_predicts_with_its_own_tokenizer(run, elsewhere):
    moved = elsewhere / "moved" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(run.ckpt, moved)
    # No training text either: the old behaviour (train a tokenizer on data.train) cannot stand in.
    common = ["--ckpt_path", str(moved), "--data.train", "null", "--trainer.default_root_dir", str(elsewhere / "out")]
    assert validate_loss(*common) == run.loss
    assert predict(elsewhere / "out", *common) == run.text
    restored = list((elsewhere / "empty_cache" / "tokenizers").iterdir())
    assert [p.name for p in restored] == [f"sp-{hashlib.sha256(run.tokenizer.model_proto).hexdigest()[:16]}.model"]
    assert restored[0].read_bytes() == run.tokenizer.model_proto
    # The same model under another file name is accepted, and used from there.
    copy = elsewhere / "copy.model"
    shutil.copy(run.tokenizer.path, copy)
    assert checkpoint_tokenizer(load_checkpoint(moved), moved, copy).path == copy


@pytest.mark.parametrize("ckpt_path", ["file", "last"])
def test_a_different_tokenizer_is_refused_naming_both(run, elsewhere, capsys, ckpt_path):
    other = trained_elsewhere(elsewhere)
    subcommand, ckpt = ("validate", str(run.ckpt)) if ckpt_path == "file" else ("fit", "last")  # "last": a resume
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                subcommand,
                *RUN,
                "--ckpt_path",
                ckpt,
                "--data.tokenizer",
                str(other.path),
                "--trainer.default_root_dir",
                str(run.root),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"lit_iiet: error: data.tokenizer {str(other.path)!r} is not the tokenizer stored in checkpoint "
        f"{str(run.ckpt)!r}; leave data.tokenizer unset to use the checkpoint's"
    )


def test_lm_eval_adapter_from_the_checkpoint_alone(run, elsewhere):
    moved = elsewhere / "model.ckpt"
    shutil.copy(run.ckpt, moved)
    alone = LitIIETLM(checkpoint=moved, device="cpu")
    given = LitIIETLM(checkpoint=run.ckpt, tokenizer=run.tokenizer.path, device="cpu")
    assert alone.tokenizer.model_proto == run.tokenizer.model_proto
    pairs = [("ROMEO:\nBut, soft! what light", " through yonder window breaks?"), ("KING HENRY:", "\nOnce more")]
    requests = [(None, alone.tok_encode(c), alone.tok_encode(x)) for c, x in pairs]
    assert alone._loglikelihood_tokens(requests, disable_tqdm=True) == given._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    other = trained_elsewhere(elsewhere)
    with pytest.raises(
        UserInputError,
        match=rf"^tokenizer {re.escape(repr(str(other.path)))} is not the tokenizer stored in checkpoint {re.escape(repr(str(moved)))}",
    ):
        LitIIETLM(checkpoint=moved, tokenizer=other.path, device="cpu")


def test_export_writes_the_tokenizer_and_import_takes_it_back(run, tmp_path):
    export_llama(run.ckpt, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == run.tokenizer.path.read_bytes()
    ckpt = import_llama(tmp_path / "hf", tmp_path / "back", ode=ODEConfig("euler", 1))
    assert torch.load(ckpt, weights_only=True)[TOKENIZER_KEY] == run.tokenizer.model_proto


def without_tokenizer(ckpt, path):
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint[TOKENIZER_KEY]
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_without_the_tokenizer_works_as_before(run, tmp_path):
    old = without_tokenizer(run.ckpt, tmp_path / "old.ckpt")
    # The data module finds the tokenizer it trained for these data settings, as before.
    assert validate_loss("--ckpt_path", str(old), "--trainer.default_root_dir", str(tmp_path)) == run.loss
    assert checkpoint_tokenizer(load_checkpoint(old), old) is None
    other = trained_elsewhere(tmp_path)  # nothing to compare a given tokenizer with: it is used
    assert checkpoint_tokenizer(load_checkpoint(old), old, other.path).path == other.path
    with pytest.raises(UserInputError, match="which carries none"):
        LitIIETLM(checkpoint=old, device="cpu")
    assert LitIIETLM(checkpoint=old, tokenizer=run.tokenizer.path, device="cpu").tokenizer.path == run.tokenizer.path
    export_llama(old, tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.model").exists()


# --- whole-document encoding ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory) -> Tokenizer:
    """A real SentencePiece model with Llama-2's training options (dummy prefix, BPE, byte fallback, split
    digits, ...), trained on the shipped validation text."""
    path = tmp_path_factory.mktemp("llama_tok") / "tokenizer.model"
    lines = [line for line in shakespeare("valid").splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(path.with_suffix("")),
        model_type="bpe",
        vocab_size=1000,
        add_dummy_prefix=True,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.99995,
        max_sentence_length=4192,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return Tokenizer(path)


def test_llama_style_documents_encode_as_sentencepiece_encodes_them(llama_style):
    assert not llama_style.lines_are_independent
    document = shakespeare("test")[:20000]
    ids = llama_style.encode_document(document)
    assert ids == llama_style.sp.encode(document) + [llama_style.eos_id]
    assert encode_document(llama_style, document) == ids
    assert llama_style.decode(ids[:-1]) == document
    # Line by line, every line after a newline would start with a dummy "▁" the model never produces there.
    by_line = [i for line in llama_style.encode_batch(document.splitlines(keepends=True)) for i in line]
    assert by_line != ids[:-1] and llama_style.sp.piece_to_id("▁") in by_line
    assert LitIIETLM.tok_encode(SimpleNamespace(tokenizer=llama_style), document) == ids[:-1]


def test_our_tokenizers_encode_lines_independently_with_the_same_ids(run):
    tok = run.tokenizer
    assert tok.lines_are_independent
    for text in (shakespeare("valid"), "a\rb\r\nc\x0bd\x0ce\x85f\u2028g\n\n  h  \n", "", "\n", "x"):
        assert tok.encode_document(text) == tok.sp.encode(text) + [tok.eos_id]
        assert tok.encode_document(text, eos=False) == tok.sp.encode(text)
