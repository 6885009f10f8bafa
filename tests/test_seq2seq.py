"""Encoder-decoder: cache exactness, beam search, metrics against the reference libraries, data, bad input."""

import gzip
import json
import math
import subprocess
import sys

import pytest
import sacrebleu
import torch
from conftest import ROOT
from rouge_score import rouge_scorer

from lit_iiet.analysis.logs import read_scalars
from lit_iiet.checkpoint import TOKENIZER_KEY
from lit_iiet.cli import build_cli, main
from lit_iiet.data import SummarizationDataModule, Tokenizer, TranslationDataModule
from lit_iiet.data.seq2seq import clean_pairs
from lit_iiet.errors import UserInputError
from lit_iiet.metrics import bleu_chrf, rouge
from lit_iiet.models.seq2seq import inverse_sqrt, label_smoothed_nll
from lit_iiet.nn.generate import beam_search, generate, top_candidates
from lit_iiet.nn.layers import KVCache
from lit_iiet.nn.ode import ODEConfig
from lit_iiet.nn.seq2seq import Seq2Seq, Seq2SeqConfig

V, BOS, EOS = 61, 2, 3
SCHEMES = {
    "euler": (ODEConfig("euler"), ODEConfig("euler")),
    "iiet_enc": (ODEConfig("iiet", 3), ODEConfig("euler")),
    "iiet_both": (ODEConfig("iiet", [2, 1]), ODEConfig("iiet", [1, 3])),
    "rk2": (ODEConfig("rk2"), ODEConfig("rk2_gated")),
    "rk4": (ODEConfig("rk4"), ODEConfig("rk4")),
    "pcformer": (ODEConfig("pcformer", branch_norm=True), ODEConfig("pcformer", branch_norm=True)),
    "iiet_scaled": (
        ODEConfig("iiet", 3, branch_scale=0.5, dropout_mask="layer"),
        ODEConfig("iiet", 2, branch_scale=0.3, dropout_mask="layer"),
    ),
}


def make(enc: ODEConfig, dec: ODEConfig) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(
        V, d_model=32, n_heads=4, enc_layers=2, dec_layers=2, d_ff=64, dropout=0.0, max_src_len=40, max_tgt_len=40
    )
    model = Seq2Seq(cfg, enc, dec).eval()
    with torch.no_grad():  # larger weights than the init, so that iterations and cache slots really differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    return model


def batch_of(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random sources of the given lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(4, V, (n,), generator=g)
    return src, src != 0


@pytest.mark.parametrize("name", list(SCHEMES))
def test_cached_decoder_steps_equal_full_decoder_forward(name):
    model = make(*SCHEMES[name])
    src, mask = batch_of([9, 5, 7])
    tgt = torch.randint(4, V, (3, 14), generator=torch.Generator().manual_seed(1))
    full = model(src, mask, tgt)
    bound = model.decoder_for(src, mask)
    cache = bound.init_cache(3, 14)
    pieces, pos = [], 0
    for n in (1, 1, 5, 1, 6):
        pieces.append(bound(tgt[:, pos : pos + n], cache, pos))
        pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["euler", "iiet_both", "pcformer"])
def test_beam_size_1_equals_greedy(name):
    model = make(*SCHEMES[name])
    src, mask = batch_of([8, 6, 3, 7], seed=2)
    greedy = generate(model.decoder_for(src, mask), torch.full((4, 1), BOS), 12, temperature=0.0, eos_id=EOS)
    beam1 = beam_search(model.decoder_for(src, mask), 4, BOS, EOS, torch.full((4,), 12), beam=1)
    for row, hyp in zip(greedy[:, 1:].tolist(), beam1):
        expected = row[: row.index(EOS)] if EOS in row else row
        assert hyp == expected


@pytest.mark.parametrize("name", ["euler", "iiet_enc"])
def test_beam_output_does_not_depend_on_batch_or_padding(name):
    model = make(*SCHEMES[name])
    src, mask = batch_of([4, 11, 7, 9], seed=3)
    max_len = torch.tensor([10, 15, 12, 13])
    together = beam_search(model.decoder_for(src, mask), 4, BOS, EOS, max_len, beam=4, lenpen=0.7)
    for b in range(4):
        n = int(mask[b].sum())
        alone = beam_search(
            model.decoder_for(src[b : b + 1, :n], mask[b : b + 1, :n]),
            1,
            BOS,
            EOS,
            max_len[b : b + 1],
            beam=4,
            lenpen=0.7,
        )
        padded_src = torch.cat([src[b : b + 1, :n], torch.zeros(1, 6, dtype=torch.long)], 1)
        padded = beam_search(
            model.decoder_for(padded_src, padded_src != 0), 1, BOS, EOS, max_len[b : b + 1], beam=4, lenpen=0.7
        )
        assert together[b] == alone[0] == padded[0]


def test_beam_constraints_length_and_no_repeat_ngram():
    model = make(*SCHEMES["euler"])
    src, mask = batch_of([6, 6], seed=4)
    max_len = torch.tensor([9, 5])
    hyps = beam_search(
        model.decoder_for(src, mask), 2, BOS, EOS, max_len, beam=3, min_len=4, no_repeat_ngram=2, banned_ids=(0, BOS)
    )
    for hyp, limit in zip(hyps, max_len.tolist()):
        assert 4 <= len(hyp) <= limit
        bigrams = list(zip(hyp, hyp[1:]))
        assert len(bigrams) == len(set(bigrams))
        assert 0 not in hyp and BOS not in hyp
    # Without the constraint, this random model repeats itself (so the check above can fail).
    free = beam_search(model.decoder_for(src, mask), 2, BOS, EOS, torch.tensor([20, 20]), beam=3)
    assert any(len(list(zip(h, h[1:]))) != len(set(zip(h, h[1:]))) for h in free)


def test_beam_search_finds_better_hypotheses_than_greedy():
    """Ranked by log-probability (lenpen 0), a wider beam never returns a worse hypothesis."""
    model = make(*SCHEMES["iiet_enc"])
    src, mask = batch_of([7, 5, 9], seed=5)

    def logprob(b: int, hyp: list[int]) -> float:
        tokens = torch.tensor([[BOS] + hyp])
        lp = model(src[b : b + 1, : int(mask[b].sum())], mask[b : b + 1, : int(mask[b].sum())], tokens).log_softmax(-1)
        return sum(lp[0, t, tok].item() for t, tok in enumerate(hyp + [EOS]))

    max_len = torch.full((3,), 8)
    narrow = beam_search(model.decoder_for(src, mask), 3, BOS, EOS, max_len, beam=1, lenpen=0.0)
    wide = beam_search(model.decoder_for(src, mask), 3, BOS, EOS, max_len, beam=6, lenpen=0.0)
    for b in range(3):
        assert logprob(b, wide[b]) >= logprob(b, narrow[b]) - 1e-5


def same_as_reference(decoder, batch, max_len, **options):
    """The tensorized beam search returns the old implementation's hypotheses and scores."""
    from benchmarks.beam_reference import reference_beam_search

    new = beam_search(decoder, batch, BOS, EOS, max_len, with_scores=True, **options)
    old = reference_beam_search(decoder, batch, BOS, EOS, max_len, with_scores=True, **options)
    assert new[0] == old[0]
    assert new[1] == pytest.approx(old[1], rel=1e-6, abs=1e-6)
    return new[0]


@pytest.mark.parametrize("name", ["iiet_both", "rk2", "rk4", "pcformer"])
def test_beam_search_equals_the_reference_for_every_decoder_scheme(name):
    """Decoder schemes with several F-evaluations per layer: every cache slot is reordered and shrunk."""
    model = make(*SCHEMES[name])
    src, mask = batch_of([8, 3, 6, 5, 7], seed=6)
    same_as_reference(
        model.decoder_for(src, mask), 5, torch.tensor([6, 9, 4, 12, 8]), beam=4, lenpen=0.8, no_repeat_ngram=2
    )


@pytest.fixture(scope="module")
def bible_sources(bible):
    """The first 24 sources of the Bible test split as the data module encodes them (+ eos), right-padded, and
    a small random model over that vocabulary whose eos is likely enough that hypotheses end at varied lengths."""
    tok = bible.tokenizer
    ids = [s[:39] + [tok.eos_id] for s in tok.encode_batch([s for s, _ in bible.texts["test"][:24]])]
    src = torch.full((len(ids), max(map(len, ids))), tok.pad_id)
    for b, row in enumerate(ids):
        src[b, : len(row)] = torch.tensor(row)
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(
        tok.vocab_size,
        d_model=32,
        n_heads=4,
        enc_layers=2,
        dec_layers=2,
        d_ff=64,
        dropout=0.0,
        max_src_len=40,
        max_tgt_len=40,
    )
    model = Seq2Seq(cfg, ODEConfig("iiet", 2), ODEConfig("euler")).eval()
    with torch.no_grad():
        model.embed.weight[tok.eos_id] *= 12  # tied output row: eos competes with the other tokens
    max_len = (1.2 * (src != tok.pad_id).sum(1) + 10).long().clamp(max=39)  # as Seq2SeqModel.translate
    return model.decoder_for(src, src != tok.pad_id), max_len, (tok.pad_id, tok.bos_id), (tok.bos_id, tok.eos_id)


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "min_len_no_repeat"])
@pytest.mark.parametrize("beam", [1, 4, 8])
def test_beam_search_equals_the_reference_on_bible_sources(bible_sources, beam, constrained):
    from benchmarks.beam_reference import reference_beam_search

    decoder, max_len, banned, (bos, eos) = bible_sources
    options = dict(min_len=6, no_repeat_ngram=3, lenpen=0.6) if constrained else dict(lenpen=1.0)
    new = beam_search(decoder, 24, bos, eos, max_len, beam, banned_ids=banned, with_scores=True, **options)
    old = reference_beam_search(decoder, 24, bos, eos, max_len, beam, banned_ids=banned, with_scores=True, **options)
    assert new[0] == old[0]
    assert new[1] == pytest.approx(old[1], rel=1e-6, abs=1e-6)
    if beam > 1:  # sentences end apart, so the batch shrinks as they finish
        assert len({len(h) for h in new[0]}) >= 3 and sum(len(h) < m for h, m in zip(new[0], max_len.tolist())) > 5


def test_kv_cache_reorder_moves_rows_and_shrinks():
    cache = KVCache(6, 2, 6, 3)
    k, v = torch.randn(6, 2, 5, 3), torch.randn(6, 2, 5, 3)
    cache(0, k, v)
    index = torch.tensor([0, 1, 2, 3, 4, 2])  # few rows move (row 5 takes row 2's beam): only they are copied
    cache.reorder(index, 5, moved=torch.tensor([5]))
    assert torch.equal(cache.prefix(5)[0], k[index]) and torch.equal(cache.prefix(5)[1], v[index])
    k, v = k[index], v[index]
    index = torch.tensor([1, 0, 2, 1, 4, 5])  # many move (rows 0 and 1 swap): every row is gathered
    cache.reorder(index, 5, moved=torch.tensor([0, 1, 3]))
    assert torch.equal(cache.prefix(5)[0], k[index]) and torch.equal(cache.prefix(5)[1], v[index])
    k, v = k[index], v[index]
    cache.reorder(torch.tensor([3, 0]), 5)  # a shorter index: finished sentences leave, the cache shrinks
    assert torch.equal(cache.prefix(5)[0], k[[3, 0]]) and cache.k.shape == (2, 2, 6, 3)
    cache(5, torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3))  # positions past the reordered ones are still writable
    assert torch.equal(cache.prefix(6)[1][:, :, :5], v[[3, 0]]) and torch.equal(
        cache.prefix(6)[1][:, :, 5], torch.ones(2, 2, 3)
    )


def test_top_candidates_equal_topk():
    g = torch.Generator().manual_seed(0)
    for rows, width, k in ((3, 4000, 8), (2, 16000, 16), (4, 61, 6), (5, 96, 4)):  # blocked, and plain topk
        cand = torch.randn(rows, width, generator=g)
        cand[0, : width // 2] = float("-inf")
        values, index = top_candidates(cand, k)
        assert torch.equal(values, cand.topk(k, dim=1).values) and torch.equal(cand.gather(1, index), values)
        assert all(len(set(row)) == k for row in index.tolist())


def test_beam_search_rejects_bad_settings():
    model = make(*SCHEMES["euler"])
    src, mask = batch_of([4])
    with pytest.raises(UserInputError, match="beam=0"):
        beam_search(model.decoder_for(src, mask), 1, BOS, EOS, torch.tensor([5]), beam=0)
    with pytest.raises(UserInputError, match="no_repeat_ngram=-1"):
        beam_search(model.decoder_for(src, mask), 1, BOS, EOS, torch.tensor([5]), no_repeat_ngram=-1)


HYPS = ["The cat sat on the mat.", "Il fait beau aujourd'hui", "a b c d e", ""]
REFS = ["The cat is sitting on the mat.", "It is nice today", "a b c d e", "nothing"]


def test_bleu_and_chrf_equal_sacrebleu():
    scores = bleu_chrf(HYPS, REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert bleu_chrf(REFS, REFS)["bleu"] == pytest.approx(100.0)


def test_rouge_equals_rouge_score():
    hyps = ["we propose a new model.\nit works well.", "the results are good"]
    refs = ["we propose a novel model.\nit works.", "results are bad"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    ours = rouge(hyps, refs)
    for key in ("rouge1", "rouge2", "rougeLsum"):
        assert ours[key] == pytest.approx(100 * sum(d[key].fmeasure for d in direct) / 2, abs=1e-9)
    assert ours["rougeLsum"] != ours["rouge2"]


def test_gpt2_init_shrinks_the_projections_into_the_stream():
    """init gpt2: weights N(0, 0.02), biases 0, projections into the stream N(0, 0.02 / sqrt(writes)) with 2 writes
    per encoder layer and 3 per decoder layer; the embedding keeps N(0, 1 / d_model)."""
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(V, d_model=128, n_heads=4, enc_layers=2, dec_layers=3, d_ff=256, init="gpt2")
    model = Seq2Seq(cfg, ODEConfig("iiet", 3), ODEConfig("euler"))
    expected = {
        "encoder.0.attn.proj.weight": 0.02 / 2,
        "encoder.1.ffn.w2.weight": 0.02 / 2,
        "decoder.2.cross_attn.proj.weight": 0.02 / 3,
        "decoder.0.ffn.w2.weight": 0.02 / 3,
        "decoder.1.self_attn.qkv.weight": 0.02,
        "encoder.0.ffn.w1.weight": 0.02,
        "embed.weight": 128**-0.5,
    }
    params = dict(model.named_parameters())
    for name, std in expected.items():
        assert abs(params[name].std().item() / std - 1) < 0.05, name
    assert all(params[n].abs().sum() == 0 for n in params if n.endswith("bias"))
    with pytest.raises(UserInputError, match="unknown init 'xavier'; choose one of torch, gpt2"):
        Seq2SeqConfig(V, init="xavier")


def test_label_smoothing_is_fairseqs_convention():
    """Target weight 1 - eps, every other class eps / (V - 1); pad targets ignored."""
    torch.manual_seed(0)
    logits, target, eps = torch.randn(2, 3, 7), torch.tensor([[1, 4, 0], [6, 0, 0]]), 0.1
    loss, nll = label_smoothed_nll(logits, target, eps, ignore_index=0)
    lp = logits.log_softmax(-1)
    q = torch.full((2, 3, 7), eps / 6).scatter(-1, target[..., None], 1 - eps)
    keep = target != 0
    assert loss.item() == pytest.approx((-(q * lp).sum(-1))[keep].mean().item(), rel=1e-6)
    assert nll.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[keep], target[keep]).item(), rel=1e-6)


def test_inverse_sqrt_schedule():
    assert inverse_sqrt(0, 4) == 0.25 and inverse_sqrt(3, 4) == 1.0
    assert inverse_sqrt(15, 4) == pytest.approx(math.sqrt(4 / 16))


# --- shipped corpora -----------------------------------------------------------------------------------------


def read_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_bible_splits_are_disjoint_by_book_and_verse():
    splits = {s: read_jsonl(ROOT / f"data/bible/fr-en.{s}.jsonl.gz") for s in ("train", "valid", "test")}
    books = {s: {r["book"] for r in rows} for s, rows in splits.items()}
    assert (
        not books["train"] & books["valid"]
        and not books["train"] & books["test"]
        and not books["valid"] & books["test"]
    )
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))
    assert all(r["fr"].strip() and r["en"].strip() for rows in splits.values() for r in rows)
    train_en = {r["en"] for r in splits["train"]}
    # Formulaic verses recur across books ("The word of Yahweh came to me, saying, ..."): 27 of 1706 here.
    assert sum(r["en"] in train_en for r in splits["test"]) < 0.03 * len(splits["test"])


def test_aclsum_splits_are_disjoint():
    splits = {s: read_jsonl(ROOT / f"data/aclsum/{s}.jsonl.gz") for s in ("train", "valid", "test")}
    assert [len(rows) for rows in splits.values()] == [100, 50, 100]
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))
    assert all(1 <= r["summary"].count("\n") <= 3 for rows in splits.values() for r in rows)


@pytest.fixture(scope="module")
def bible(tmp_path_factory):
    dm = TranslationDataModule(
        vocab_size=1000,
        max_src_len=64,
        max_tgt_len=64,
        batch_size=4,
        cache_dir=str(tmp_path_factory.mktemp("bible_cache")),
    )
    dm.prepare_data()
    dm.setup()
    return dm


def test_bible_loads_and_round_trips_through_the_joint_tokenizer(bible):
    assert bible.tokenizer.vocab_size == 1000
    for src, tgt in bible.texts["test"][:200]:
        assert bible.tokenizer.decode(bible.tokenizer.encode(src)) == src
        assert bible.tokenizer.decode(bible.tokenizer.encode(tgt)) == tgt
    batch = next(iter(bible.train_dataloader()))
    assert torch.equal(batch["src_mask"], batch["src"] != bible.tokenizer.pad_id)
    assert (batch["tgt_in"][:, 0] == bible.tokenizer.bos_id).all()
    n = (batch["tgt_out"] != bible.tokenizer.pad_id).sum(1)  # target + eos
    assert torch.equal(batch["tgt_out"][torch.arange(4), n - 1], torch.full((4,), bible.tokenizer.eos_id))
    shifted = batch["tgt_in"][:, 1:] != bible.tokenizer.pad_id  # tgt_in = <bos> + target, tgt_out = target + <eos>
    assert torch.equal(batch["tgt_in"][:, 1:][shifted], batch["tgt_out"][:, :-1][shifted])


@pytest.mark.parametrize(
    "config, fields",
    [
        ("conf/sum/aclsum_iiet.yaml", ("document", "summary")),
        ("conf/sum/cnn_dailymail_iiet.yaml", ("article", "highlights")),
        ("conf/mt/bible_fr_en.yaml", ("fr", "en")),
    ],
)
def test_data_fields_resolve_through_the_cli(config, fields):
    """Defaults that subclasses derive (schema or language -> field names) survive LightningCLI's instantiation."""
    cli = build_cli(
        run=False,
        args=[
            "--config",
            config,
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.precision",
            "32-true",
            "--trainer.strategy",
            "auto",
        ],
    )
    assert (cli.datamodule.src_field, cli.datamodule.tgt_field) == fields


def test_summarization_data_keeps_sentence_lines(tmp_path):
    dm = SummarizationDataModule(vocab_size=600, max_src_len=128, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup()
    _, summary = dm.texts["test"][0]
    assert summary.count("\n") >= 1
    assert dm.tokenizer.decode(dm.tokenizer.encode(summary)) == summary


# --- bad input -----------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def cleaning_corpus(tmp_path):
    """Training pairs with known cleaning outcomes under drop_longer_than=50, drop_ratio_above=1.5 (SentencePiece
    splits each word on its own, so n copies of a word are n x its tokens, whatever the vocabulary learns)."""
    kept = [(f"the cat {i} sat", f"the cat {i} sat") for i in range(12)]
    kept.append(("ab ab", "ab ab ab"))  # a ratio of exactly 1.5 is kept ("over 1.5" is dropped)
    empty = [("", "x"), ("   ", "y"), ("z", "\n")]
    long = [("mot " * 60, "mot " * 60), ("mot", "mot " * 60), ("mot " * 60, "word")]  # either side over 50
    ratio = [("ab ab", "ab ab ab ab"), ("cd cd cd cd cd", "cd cd")]  # ratios 2 and 2.5
    pairs = kept[:6] + empty[:2] + long + kept[6:] + ratio + empty[2:]
    train = write_jsonl(tmp_path / "train.jsonl", [{"fr": s, "en": t} for s, t in pairs])
    return train, kept


def test_cleaning_drops_empty_long_and_bad_ratio_training_pairs_with_counts(tmp_path, caplog):
    train, kept = cleaning_corpus(tmp_path)
    val = write_jsonl(tmp_path / "val.jsonl", [{"fr": "the cat", "en": ""}, {"fr": "ab " * 70, "en": "ab"}])
    dm = TranslationDataModule(
        train=train,
        val=val,
        test=None,
        vocab_size=300,
        drop_longer_than=50,
        drop_ratio_above=1.5,
        cache_dir=str(tmp_path),
    )
    dm.prepare_data()
    with caplog.at_level("INFO"):
        dm.setup()
    messages = [r.getMessage() for r in caplog.records]
    assert "train: kept 13 of 21 pairs (dropped 3 empty, 3 over 50 tokens, 2 with length ratio > 1.5)" in messages
    assert "val: 1 of 2 pairs have an empty side; kept (only train is cleaned, so scores cover every pair)" in messages
    decode = dm.tokenizer.decode
    train_pairs = [(decode(s[:-1].tolist()), decode(t.tolist())) for _, s, t in dm.datasets["train"]]
    assert train_pairs == kept  # exactly the clean pairs, in file order
    assert len(dm.datasets["val"]) == len(dm.texts["val"]) == 2  # val is not cleaned: references stay aligned
    assert dm.datasets["val"][0][2].numel() == 0  # the empty target: tgt_out is a lone eos
    next(iter(dm.val_dataloader()))


def test_empty_pairs_are_dropped_by_default_or_kept_on_request(tmp_path, caplog):
    """An empty side used to abort the run; now it is dropped by default (no length or ratio filter)."""
    train, kept = cleaning_corpus(tmp_path)
    dm = TranslationDataModule(train=train, val=None, test=None, vocab_size=300, cache_dir=str(tmp_path))
    dm.prepare_data()
    with caplog.at_level("INFO"):
        dm.setup()
    assert "train: kept 18 of 21 pairs (dropped 3 empty)" in [r.getMessage() for r in caplog.records]
    assert len(dm.datasets["train"]) == 18
    caplog.clear()
    dm = TranslationDataModule(
        train=train, val=None, test=None, vocab_size=300, drop_empty=False, cache_dir=str(tmp_path)
    )
    dm.prepare_data()
    with caplog.at_level("INFO"):
        dm.setup()
    assert [r.getMessage() for r in caplog.records] == [
        "train: 3 of 21 pairs have an empty side; kept (data.drop_empty is false)"
    ]
    assert len(dm.datasets["train"]) == 21


def test_clean_pairs_counts_each_dropped_pair_once():
    keep, dropped = clean_pairs(
        src_lens=[3, 0, 9, 9, 2, 4],
        tgt_lens=[3, 5, 1, 2, 3, 0],
        empty=[0, 1, 0, 0, 0, 1],
        drop_empty=True,
        max_len=8,
        max_ratio=1.5,
    )
    assert keep.tolist() == [True, False, False, False, True, False]
    assert dropped == {"empty": 2, "long": 2, "ratio": 0}  # 9 vs 1 is long and a bad ratio: counted as long
    keep, dropped = clean_pairs([3, 0, 9], [3, 5, 1], [0, 1, 0], drop_empty=False, max_len=None, max_ratio=1.5)
    assert keep.tolist() == [True, True, False] and dropped == {"empty": 0, "long": 0, "ratio": 1}


@pytest.mark.parametrize(
    "option, message",
    [
        ({"drop_longer_than": 0}, "drop_longer_than=0: give a number of tokens >= 1, or null to keep every length"),
        (
            {"drop_ratio_above": 0.9},
            r"drop_ratio_above=0.9: give a length ratio >= 1 \(fairseq's WMT recipe uses 1.5\)",
        ),
        ({"drop_ratio_above": float("nan")}, "drop_ratio_above=nan: give a length ratio >= 1"),
    ],
)
def test_bad_cleaning_options_are_one_line_errors(option, message):
    with pytest.raises(UserInputError, match=message) as error:
        TranslationDataModule(**option)
    assert "\n" not in str(error.value)


def test_cleaning_that_drops_every_pair_says_which_options_did(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"fr": "mot " * 20, "en": "word " * 20}] * 3)
    dm = TranslationDataModule(
        train=train, val=None, test=None, vocab_size=270, drop_longer_than=5, cache_dir=str(tmp_path)
    )
    with pytest.raises(UserInputError, match=r"cleaning dropped all 3 pairs \(dropped 0 empty, 3 over 5 tokens\)"):
        dm.prepare_data()


def test_parallel_files_must_align(tmp_path):
    (tmp_path / "train.fr").write_text("un\ndeux\ntrois\n", encoding="utf-8")
    (tmp_path / "train.en").write_text("one\ntwo\n", encoding="utf-8")
    dm = TranslationDataModule(
        train=str(tmp_path / "train"), val=None, test=None, vocab_size=300, cache_dir=str(tmp_path)
    )
    with pytest.raises(UserInputError, match=r"train.fr has 3 lines but .*train.en has 2"):
        dm.pairs("train")
    (tmp_path / "train.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert dm.pairs("train") == [("un", "one"), ("deux", "two"), ("trois", "three")]


def test_long_sources_truncate_with_a_count_or_are_rejected(tmp_path):
    rows = [{"fr": "mot " * n, "en": "word"} for n in (3, 80, 90, 4)] * 30
    train = write_jsonl(tmp_path / "long.jsonl", rows)
    common = dict(train=train, val=None, test=None, vocab_size=270, max_src_len=16, cache_dir=str(tmp_path))
    dm = TranslationDataModule(**common)
    with pytest.warns(
        UserWarning, match="60 of 120 train sources are longer than max_src_len=16 tokens and were truncated"
    ):
        dm.prepare_data()
    dm.setup()
    assert max(len(dm.datasets["train"][i][1]) for i in range(120)) == 16
    with pytest.raises(
        UserInputError, match=r"train pair 1 has a source of \d+ tokens, more than max_src_len=16 \(60 such pairs"
    ):
        TranslationDataModule(**common, long_source="reject").prepare_data()


@pytest.mark.parametrize("langs, message", [(("fr", "xx"), "unknown language code 'xx'"), (("en", "en"), "both 'en'")])
def test_language_codes_are_checked(langs, message):
    with pytest.raises(UserInputError, match=message):
        TranslationDataModule(*langs)


def test_unavailable_datasets_source_says_how_to_provide_it(tmp_path, hf_offline):
    dm = TranslationDataModule("en", "de", hf_dataset="wmt14", hf_name="de-en", vocab_size=300, cache_dir=str(tmp_path))
    with pytest.raises(UserInputError, match="not available locally.*save_to_disk"):
        dm.pairs("train")


# --- the CLI, end to end ------------------------------------------------------------------------------------

TINY_MT = [
    "--config",
    "conf/mt/bible_fr_en.yaml",
    "--model.arch.d_model",
    "32",
    "--model.arch.n_heads",
    "2",
    "--model.arch.enc_layers",
    "2",
    "--model.arch.dec_layers",
    "1",
    "--model.arch.d_ff",
    "64",
    "--model.arch.vocab_size",
    "600",
    "--data.vocab_size",
    "600",
    "--data.batch_size",
    "8",
    "--data.max_tokens",
    "null",
    "--data.max_src_len",
    "48",
    "--data.max_tgt_len",
    "48",
    "--model.decoding.beam",
    "2",
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "4",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.limit_test_batches",
    "2",
    "--model.val_decode_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.log_every_n_steps",
    "1",
]


def test_translation_fit_test_and_average(tmp_path, capsys):
    run = tmp_path / "mt"
    main(["fit", *TINY_MT, "--trainer.default_root_dir", str(run)])
    scalars = read_scalars(run)
    for tag in ("train/loss", "train/nll_loss", "val/loss", "val/nll_loss", "val/ppl", "val/bleu", "val/chrf"):
        assert tag in scalars, tag
    # The IIET encoder's convergence (2 layers, r = 3); the vanilla decoder's layers take one step: its relative
    # size, and no contraction.
    for layer in (0, 1):
        assert all(scalars[f"iiet/increment/enc{layer}/{k}"][-1][1] > 0 for k in (1, 2, 3))
        assert scalars[f"iiet/contraction/enc{layer}"][-1][1] > 0
    assert [tag for tag in scalars if "dec0" in tag] == ["iiet/increment/dec0/1"]
    capsys.readouterr()
    main(["test", *TINY_MT, "--trainer.default_root_dir", str(run), "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    out = capsys.readouterr().out
    assert "test BLEU = " in out and "BLEU signature: nrefs:1|case:mixed|eff:no|tok:13a" in out
    hyp_file = next(run.rglob("test.hyp.txt"))
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()
    refs = (hyp_file.parent / "test.ref.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 16
    printed = float(out.split("test BLEU = ")[1].split()[0])
    assert printed == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.01)

    # Average the best and last checkpoints with the command-line tool.
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    out_file = tmp_path / "avg.ckpt"
    cmd = [sys.executable, "-m", "lit_iiet.average_checkpoints", *map(str, ckpts), "--output", str(out_file)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in ckpts)
    avg = torch.load(out_file, weights_only=True)["state_dict"]
    key = "model.embed.weight"
    torch.testing.assert_close(avg[key], (a[key] + b[key]) / 2)
    # Every checkpoint, and the average, carries the run's joint tokenizer.
    protos = {torch.load(p, weights_only=True)[TOKENIZER_KEY] for p in [*ckpts, out_file]}
    assert len(protos) == 1 and Tokenizer.from_model_proto(protos.pop(), tmp_path).vocab_size == 600
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr
