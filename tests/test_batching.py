"""Token-budget batches of translation pairs (Seq2SeqDataModule(max_tokens=...)), and val_check_interval counted in
optimizer steps by the CLI."""

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_data import fit_and_resume, trainer_test

from lit_iiet.analysis.logs import read_scalars
from lit_iiet.cli import main
from lit_iiet.data import TranslationDataModule
from lit_iiet.data.lm import ResumableSampler
from lit_iiet.data.seq2seq import BatchedPairs, split_to_divide, token_batches
from lit_iiet.errors import UserInputError

BUDGET = 320


def bible_rows(split: str, n: int) -> list[dict]:
    with gzip.open(ROOT / f"data/bible/fr-en.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small Bible splits as JSONL (verses of 2 to 100+ tokens), and a joint tokenizer (vocab 400) trained on them."""
    d = tmp_path_factory.mktemp("pairs")
    paths = {}
    for split, name, n in (("train", "train", 150), ("val", "valid", 40), ("test", "test", 16)):
        paths[split] = d / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in bible_rows(name, n)), encoding="utf-8")
    dm = TranslationDataModule(**{k: str(v) for k, v in paths.items()}, vocab_size=400, cache_dir=str(d / "cache"))
    dm.prepare_data()
    return {**paths, "tokenizer": dm.tokenizer_path(), "cache": d / "cache"}


def datamodule(files, **kwargs) -> TranslationDataModule:
    dm = TranslationDataModule(
        train=str(files["train"]),
        val=str(files["val"]),
        test=str(files["test"]),
        tokenizer=str(files["tokenizer"]),
        max_src_len=128,
        max_tgt_len=128,
        cache_dir=str(files["cache"]),
        **kwargs,
    )
    dm.setup()
    return dm


def padded_sizes(batch: dict) -> tuple[int, int]:
    return batch["src"].numel(), batch["tgt_in"].numel()


def padding(batches: list[dict], pad_id: int) -> float:
    """Pad tokens / all tokens of the padded source and target tensors."""
    real = sum(int(b["src_mask"].sum() + b["tgt_in"].ne(pad_id).sum()) for b in batches)
    return 1 - real / sum(sum(padded_sizes(b)) for b in batches)


def test_token_batches_fit_the_budget_and_take_every_pair_once():
    rng = np.random.default_rng(0)
    src = rng.integers(1, 60, 500)
    tgt = src + rng.integers(1, 10, 500)  # correlated, as in translation
    for budget in (70, 128, 1000):
        batches = token_batches(src, tgt, budget, seed=3)
        assert sorted(np.concatenate(batches).tolist()) == list(range(500))
        assert all(len(b) * max(src[b].max(), tgt[b].max()) <= budget for b in batches)
        # Greedy: the next pair would not have fitted.
        for b, nxt in zip(batches, batches[1:]):
            assert (len(b) + 1) * max(src[b].max(), tgt[b].max(), src[nxt[0]], tgt[nxt[0]]) > budget
    random_pads = sum(
        len(b) * (src[b].max() + tgt[b].max()) for b in np.array_split(rng.permutation(500), len(batches))
    )
    bucketed_pads = sum(len(b) * (src[b].max() + tgt[b].max()) for b in batches)
    assert bucketed_pads < 0.7 * random_pads

    def cut(seed):
        return [b.tolist() for b in token_batches(src, tgt, 128, seed)]

    assert cut(3) == cut(3) and cut(3) != cut(4), "the tie-break follows the seed"


def test_split_to_divide_keeps_the_budget_and_the_pairs():
    batches = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 9)]
    split = split_to_divide(batches, 4)
    assert [b.tolist() for b in split] == [[0, 1], [2, 3, 4], [5], [6, 7, 8]]
    assert split_to_divide(batches, 3) == batches
    assert len(split_to_divide([np.arange(1)], 2)) == 1  # fewer pairs than ranks: nothing to split


def test_training_batches_fit_the_budget_and_cover_the_epoch(files):
    dm = datamodule(files, max_tokens=BUDGET)
    lens = dm.datasets["train"].lengths()
    assert max(lens[0].max(), lens[1].max()) > BUDGET / 4, "some pairs are long enough to test the budget"
    loader = dm.train_dataloader()
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(max(padded_sizes(b)) <= BUDGET for b in batches)
        assert all(torch.equal(b["src_mask"], b["src"] != dm.tokenizer.pad_id) for b in batches)
        indices = [i for b in batches for i in b["index"].tolist()]
        assert sorted(indices) == list(range(150))
        epochs.append([b["index"].tolist() for b in batches])
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1]), "same batches, shuffled per epoch"
    random_batches = list(datamodule(files, batch_size=round(150 / len(batches))).train_dataloader())
    # Bucketing pads less than random batches of about as many pairs.
    assert padding(batches, dm.tokenizer.pad_id) < 0.5 * padding(random_batches, dm.tokenizer.pad_id)


@pytest.mark.parametrize("budget", range(260, 400, 20))
def test_two_ranks_get_disjoint_batches_covering_the_epoch(files, budget):
    dm = datamodule(files, max_tokens=budget)
    ds = dm.datasets["train"]
    batches = split_to_divide(token_batches(*ds.lengths(), budget, seed=5), 2)
    assert len(batches) % 2 == 0
    ranks = []
    for rank in (0, 1):
        sampler = ResumableSampler(
            BatchedPairs(ds, batches, dm.collate), num_replicas=2, rank=rank, shuffle=True, seed=5
        )
        sampler.set_epoch(1)
        ranks.append([i for k in sampler for i in batches[k].tolist()])
    assert len(ranks[0]) + len(ranks[1]) == 150 and sorted(ranks[0] + ranks[1]) == list(range(150))
    assert all(max(padded_sizes(dm.collate([ds[i] for i in b]))) <= budget for b in batches)


def test_odd_batch_counts_occur_among_those_budgets(files):
    """The test above meets batch lists that split_to_divide must split."""
    lens = datamodule(files).datasets["train"].lengths()
    assert any(len(token_batches(*lens, budget, seed=5)) % 2 for budget in range(260, 400, 20))


def test_eval_batches_are_length_sorted_and_cover_the_split_once(files):
    dm = datamodule(files, max_tokens=BUDGET)
    src_lens = dm.datasets["val"].lengths()[0]
    batches = list(dm.val_dataloader())
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(40))
    assert all(max(padded_sizes(b)) <= BUDGET for b in batches)
    # Each batch holds a band of source lengths; the bands do not interleave.
    bands = sorted((src_lens[b["index"]].min(), src_lens[b["index"]].max()) for b in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(bands, bands[1:]))
    again = [b["index"].tolist() for b in dm.val_dataloader()]
    assert [b["index"].tolist() for b in batches] == again, "a fixed order"


def test_too_small_budget_is_refused(files):
    with pytest.raises(
        UserInputError,
        match=r"^max_tokens=63 is smaller than the longest allowed pair \(max_src_len=64, max_tgt_len=40\)",
    ):
        TranslationDataModule(max_src_len=64, max_tgt_len=40, max_tokens=63)
    with pytest.raises(UserInputError, match=r"max_tokens=90 .*max_src_len=32, max_tgt_len=100"):
        TranslationDataModule(max_src_len=32, max_tgt_len=100, max_tokens=90)
    TranslationDataModule(max_src_len=32, max_tgt_len=100, max_tokens=100)


def fit_indices(files, tmp_path, stop: str | None = None) -> dict:
    """3 epochs of token-budget batches; with `stop`, crash there and resume. Epoch -> batches, both runs together."""

    def datamodule():
        return TranslationDataModule(
            train=str(files["train"]),
            val=None,
            test=None,
            tokenizer=str(files["tokenizer"]),
            max_src_len=128,
            max_tgt_len=128,
            max_tokens=BUDGET,
            cache_dir=str(files["cache"]),
        )

    return fit_and_resume(datamodule, tmp_path, 3, stop, record=lambda batch: batch["index"].tolist())


@trainer_test
@pytest.mark.parametrize("stop", ["batch", "epoch"])
def test_resumed_run_trains_the_uninterrupted_token_batches(files, tmp_path, monkeypatch, stop):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    uninterrupted = fit_indices(files, tmp_path / "full")
    assert len(uninterrupted[0]) >= 6 and uninterrupted[0] != uninterrupted[1]
    assert all(sorted(i for b in uninterrupted[e] for i in b) == list(range(150)) for e in (0, 1, 2))
    assert fit_indices(files, tmp_path / stop, stop=stop) == uninterrupted


# --- the CLI ------------------------------------------------------------------------------------------------------


def tiny_mt(files, run) -> list[str]:
    return [
        "--config",
        "conf/mt/bible_fr_en.yaml",
        "--data.train",
        str(files["train"]),
        "--data.val",
        str(files["val"]),
        "--data.test",
        str(files["test"]),
        "--data.tokenizer",
        str(files["tokenizer"]),
        "--data.cache_dir",
        str(files["cache"]),
        "--model.arch.vocab_size",
        "400",
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
        "--data.max_src_len",
        "128",
        "--data.max_tgt_len",
        "128",
        "--data.batch_size",
        "4",
        "--data.max_tokens",
        "null",
        "--model.decoding.beam",
        "2",
        "--model.decoding.max_len_a",
        "0.25",
        "--model.decoding.max_len_b",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        str(run),
    ]


@pytest.mark.slow
def test_val_check_interval_counts_optimizer_steps(files, tmp_path):
    run = tmp_path / "run"
    main(
        [
            "fit",
            *tiny_mt(files, run),
            "--trainer.accumulate_grad_batches",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.max_steps",
            "6",
            "--trainer.limit_val_batches",
            "1",
            "--model.val_decode_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    scalars = read_scalars(run)
    # Lightning logs at the 0-based index of the latest optimizer step: train/loss at 0..5 for the 6 steps, and
    # a validation after optimizer steps 2, 4 and 6 at 1, 3 and 5 (every batch, 0..5, before this rule).
    assert sorted({step for step, _ in scalars["train/loss"]}) == [0, 1, 2, 3, 4, 5]
    assert [step for step, _ in scalars["val/loss"]] == [1, 3, 5]
    saved = next(run.rglob("config.yaml")).read_text()
    assert "val_check_interval: 2\n" in saved, "the saved config keeps the value as given"


@pytest.mark.slow
def test_token_budget_test_outputs_stay_in_input_order(files, tmp_path):
    """`test` with length-sorted batches writes the hypotheses of batch_size batches, in input order (same random
    model: seed_everything; the beam output of a pair does not depend on its batch or padding). The untrained
    model never ends a hypothesis early, so their lengths (source / 4 + 2) tell the pairs apart."""
    outputs = {}
    for name, extra in (("pairs", []), ("tokens", ["--data.max_tokens", "384"])):
        main(["test", *tiny_mt(files, tmp_path / name), *extra])
        out = next((tmp_path / name).rglob("test.hyp.txt")).parent
        outputs[name] = {
            f: (out / f"test.{f}.txt").read_text(encoding="utf-8").splitlines() for f in ("hyp", "ref", "src")
        }
    rows = bible_rows("test", 16)
    assert outputs["tokens"]["src"] == [r["fr"] for r in rows] and outputs["tokens"]["ref"] == [r["en"] for r in rows]
    assert outputs["tokens"] == outputs["pairs"]
    assert len(set(outputs["tokens"]["hyp"])) > 8, "the hypotheses differ, so a mix-up would show"


def test_padding_benchmark_counts_pads_and_matches_pairs_per_batch():
    from benchmarks.seq2seq_padding import padded_fraction, padding_fractions, wmt_like_lengths

    src, tgt = np.array([2, 4, 5]), np.array([3, 3, 7])
    assert padded_fraction(src, tgt, [np.array([0, 1]), np.array([2])]) == pytest.approx(
        1 - 24 / 26
    )  # 2 x (4 + 3) + 12
    src, tgt = wmt_like_lengths(4000)
    assert 28 < src.mean() < 34 and src.max() <= 251 and tgt.max() <= 251
    r = padding_fractions(src, tgt, batch_size=32)
    assert 32 <= r["pairs_per_batch"] < 33
    assert r["bucketed"] < r["random"] / 4
