"""Translating and summarizing new text: `predict` from the CLI, `Seq2SeqModel.generate_text` in Python, TEXT samples in
TensorBoard, the papers' compound-split BLEU, bad input."""

import contextlib
import gzip
import io
import json
import math
import re

import pytest
from conftest import ROOT
from test_seq2seq import TINY_MT

from lit_iiet.analysis.logs import read_scalars, read_texts
from lit_iiet.cli import main
from lit_iiet.data import TranslationDataModule
from lit_iiet.data.seq2seq import read_sources
from lit_iiet.errors import UserInputError
from lit_iiet.metrics import compound_split, compound_split_bleu
from lit_iiet.models import Seq2SeqModel

# French sources of very different lengths: an untrained model's outputs run to max_len_a * length + max_len_b,
# so a line in the wrong place shows. The first is the docs/SEQ2SEQ.md snippet's.
SOURCES = [
    "Au commencement, Dieu créa les cieux et la terre.",
    "Jésus pleura.",
    "Et Dieu dit: Que la lumière soit! Et la lumière fut.",
    "Heureux les pauvres en esprit, car le royaume des cieux est à eux.",
    "Amen.",
    "L'Éternel est mon berger: je ne manquerai de rien.",
    "Car Dieu a tant aimé le monde qu'il a donné son Fils unique.",
]
# Short outputs (0.25 x source length + 3 tokens) keep decoding fast; the checkpoint keeps TINY_MT's beam 2.
MT = [*TINY_MT, "--model.decoding.max_len_a", "0.25", "--model.decoding.max_len_b", "3"]


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory):
    """A tiny Bible model fitted for 4 steps, one validation with 2 TEXT samples and compound-split BLEU."""
    root = tmp_path_factory.mktemp("mt_predict")
    main(
        [
            "fit",
            *MT,
            "--trainer.default_root_dir",
            str(root),
            "--model.val_text_samples",
            "2",
            "--model.compound_split_bleu",
            "true",
        ]
    )
    return root, root / "checkpoints" / "last.ckpt"


def predict(config: list[str], root, ckpt, *args) -> str:
    """What `predict` prints."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["predict", *config, "--trainer.default_root_dir", str(root), "--ckpt_path", str(ckpt), *args])
    return out.getvalue()


@pytest.fixture(scope="module")
def mt_predicted(mt_run, tmp_path_factory):
    """`predict` of SOURCES with beam 5 from the command line, in batches of 3: what it printed, the lines it wrote."""
    root, ckpt = mt_run
    sources = tmp_path_factory.mktemp("sources") / "verses.fr.txt"
    sources.write_text("".join(s + "\n" for s in SOURCES), encoding="utf-8")
    out = predict(
        MT, root, ckpt, "--data.predict", str(sources), "--data.batch_size", "3", "--model.decoding.beam", "5"
    )
    return sources, out, (root / "predictions.txt").read_text(encoding="utf-8").splitlines()


def test_mt_predict_writes_outputs_in_input_order_with_the_command_lines_beam(mt_run, mt_predicted):
    root, ckpt = mt_run
    sources, out, lines = mt_predicted
    # Batches of 3 in length order come back in another order than the lines.
    assert "decoding 7 sources: beam=5 lenpen=1.0 max_len=0.25*src+3 " in out  # the checkpoint has beam 2
    assert len(lines) == len(SOURCES) and len(set(lines)) > 1
    assert f"7 outputs, in input order: {root / 'predictions.txt'}" in out
    # Each source decoded alone, in Python, with the same settings: the same text on the same line.
    model = Seq2SeqModel.from_checkpoint(ckpt)
    assert model.decoding.beam == 2
    assert lines == [model.generate_text([s], beam=5)[0] for s in SOURCES]
    # A second run writes a new file; the first stays as it was.
    out = predict(MT, root, ckpt, "--data.predict", str(sources), "--model.decoding.beam", "1")
    assert "beam=1 " in out and (root / "predictions.txt").read_text(encoding="utf-8").splitlines() == lines
    assert (root / "predictions-v1.txt").read_text(encoding="utf-8").splitlines() == model.generate_text(
        SOURCES, beam=1
    )


def test_readme_python_snippet_gives_what_predict_writes(mt_run, mt_predicted):
    page = (ROOT / "docs" / "SEQ2SEQ.md").read_text(encoding="utf-8")
    section = page.split("## Translating and summarizing new text", 1)[1]
    snippet = re.search(r"```python\n(.+?)```", section, re.S).group(1)
    assert "generate_text([SOURCE], beam=5)".replace("SOURCE", repr(SOURCES[0]).replace("'", '"')) in snippet
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(snippet.replace("runs/bible_fr_en/checkpoints/last.ckpt", str(mt_run[1])), {})
    assert out.getvalue().strip() == repr(mt_predicted[2][:1])


def test_validation_logs_text_samples_and_compound_split_bleu(mt_run):
    root, _ = mt_run
    (samples,) = read_texts(root, "val/samples")  # one validation, after step 4
    with gzip.open(ROOT / "data/bible/fr-en.valid.jsonl.gz", "rt", encoding="utf-8") as f:
        first, second = (json.loads(next(f)) for _ in range(2))
    assert samples.count("source:") == samples.count("reference:") == samples.count("hypothesis:") == 2
    for i, pair in enumerate((first, second)):
        assert (
            f"**#{i}**" in samples
            and f"source:     {pair['fr']}\n" in samples
            and f"reference:  {pair['en']}\n" in samples
        )
    scalars = read_scalars(root)
    assert "val/bleu_compound_split" in scalars and "val/bleu" in scalars
    (signature,) = read_texts(root, "val/bleu_compound_split_signature")
    assert signature.startswith("pre:13a+compound_split|nrefs:1|case:mixed|eff:no|tok:none|smooth:none")


SUM = [
    "--config",
    "conf/sum/aclsum_iiet.yaml",
    "--model.arch.d_model",
    "32",
    "--model.arch.n_heads",
    "2",
    "--model.arch.enc_layers",
    "1",
    "--model.arch.dec_layers",
    "1",
    "--model.arch.d_ff",
    "64",
    "--model.arch.vocab_size",
    "600",
    "--data.vocab_size",
    "600",
    "--data.batch_size",
    "2",
    "--data.max_tokens",
    "null",
    "--model.arch.max_src_len",
    "64",
    "--data.max_src_len",
    "64",
    "--model.val_decode_batches",
    "0",
    "--model.decoding.beam",
    "2",
    "--model.decoding.min_len",
    "2",
    "--model.decoding.max_len_b",
    "12",
    "--trainer.max_steps",
    "1",
    "--trainer.val_check_interval",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


def test_summarization_predict_from_jsonl_in_input_order(tmp_path, capsys):
    root = tmp_path / "sum"
    main(["fit", *SUM, "--trainer.default_root_dir", str(root)])
    ckpt = root / "checkpoints" / "last.ckpt"
    with gzip.open(ROOT / "data/aclsum/test.jsonl.gz", "rt", encoding="utf-8") as f:
        documents = [json.loads(next(f))["document"] for _ in range(3)]
    papers = tmp_path / "papers.jsonl.gz"
    with gzip.open(papers, "wt", encoding="utf-8") as f:
        f.write(
            "".join(json.dumps({"document": d, "id": k}) + "\n\n" for k, d in enumerate(documents))
        )  # blank lines skipped
    with pytest.warns(
        UserWarning, match="3 of 3 predict sources are longer than max_src_len=64 tokens and were truncated"
    ):
        out = predict(SUM, root, ckpt, "--data.predict", str(papers), "--model.decoding.max_len_b", "6")
    assert "decoding 3 sources: beam=2 " in out
    lines = (root / "predictions.txt").read_text(encoding="utf-8").splitlines()
    model = Seq2SeqModel.from_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="1 of 1 given sources"):
        assert lines == [model.generate_text([d], max_len_b=6)[0].replace("\n", " ") for d in documents]
    with pytest.raises(SystemExit) as exit_info:
        predict(SUM, root, ckpt, "--data.predict", str(papers), "--data.long_source", "reject")
    assert exit_info.value.code == 2 and "predict source 0 has a source of" in capsys.readouterr().err
    assert not (root / "predictions-v1.txt").exists()


# --- the papers' BLEU: known answers -------------------------------------------------------------------------


def test_compound_split_follows_the_scripts_perl_substitution():
    assert compound_split("a rich-text format") == "a rich ##AT##-##AT## text format"
    assert compound_split("a-b-c") == "a ##AT##-##AT## b-c"  # perl's s///g: matches do not overlap
    assert compound_split("5 - 3 and -x") == "5 - 3 and -x"


def test_compound_split_bleu_known_answers():
    # 13a: "The well-known cat sat ." ; split: The well ##AT##-##AT## known cat sat . (7 tokens each side)
    # matches 1-4-grams: 6/7, 4/6, 3/5, 2/4, equal lengths (no brevity penalty).
    score = compound_split_bleu(["The well-known cat ran."], ["The well-known cat sat."])
    assert score["bleu_compound_split"] == pytest.approx(100 * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, abs=1e-9)
    # Unsplit, 5 tokens and no matching 4-gram: unsmoothed BLEU is 0; the split is what makes it 64.3.
    assert score["bleu_compound_split"] == pytest.approx(64.34, abs=0.01)
    # A shorter hypothesis: 6 tokens against 7; 6/6, 4/5, 3/4, 2/3 and the brevity penalty exp(1 - 7/6).
    score = compound_split_bleu(["The well-known cat."], ["The well-known cat sat."])
    expected = 100 * math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert score["bleu_compound_split"] == pytest.approx(expected, abs=1e-9)
    assert "tok:none|smooth:none" in score["bleu_compound_split_signature"]


# --- bad input -----------------------------------------------------------------------------------------------


def test_missing_empty_or_unknown_predict_files_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UserInputError, match=r"predict data file '.*nope.txt' does not exist"):
        TranslationDataModule(predict=str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserInputError, match=r"predict data file '.*empty.txt' is empty"):
        TranslationDataModule(predict=str(tmp_path / "empty.txt"))
    with pytest.raises(UserInputError, match=r"predict data 'x.csv': expected one of .txt, .txt.gz, .jsonl, .jsonl.gz"):
        TranslationDataModule(predict="x.csv")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", "conf/mt/bible_fr_en.yaml", "--data.predict", str(tmp_path / "nope.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"lit_iiet: error: predict data file {str(tmp_path / 'nope.txt')!r} does not exist"


def test_bad_lines_of_a_predict_file_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"fr": "Bonjour"}\n{"en": "Hello"}\n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"a.jsonl:2: no source text in field 'fr' \(fields: en\)$"):
        read_sources(tmp_path / "a.jsonl", "fr")
    (tmp_path / "b.txt").write_text("Bonjour\n\nSalut\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"b.txt:2: empty line; every line of a .txt predict file is one source"):
        read_sources(tmp_path / "b.txt", "fr")
    (tmp_path / "c.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="holds no sources"):
        read_sources(tmp_path / "c.jsonl", "fr")
    with gzip.open(tmp_path / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Bonjour\r\nSalut")
    assert read_sources(tmp_path / "d.txt.gz", "fr") == ["Bonjour", "Salut"]


def test_generate_text_checks_its_settings(mt_run):
    model = Seq2SeqModel.from_checkpoint(mt_run[1])
    with pytest.raises(UserInputError, match="unknown decoding setting 'bem'; choose from beam, lenpen"):
        model.generate_text(["Bonjour"], bem=4)
    with pytest.raises(UserInputError, match="decoding.beam=0 must be >= 1"):
        model.generate_text(["Bonjour"], beam=0)
    with pytest.raises(UserInputError, match="sources is one string"):
        model.generate_text("Bonjour")
    assert model.decoding.beam == 2  # a call's settings never change the model's
