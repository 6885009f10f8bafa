"""Padding in translation training batches: random batches of batch_size pairs vs length-bucketed token budgets.

    python -m benchmarks.seq2seq_padding [--wmt_pairs 200000] [--seed 0]

Padding fraction = pad tokens / all tokens of the padded source and target tensors (rows x longest row, summed over
a training epoch's batches). "random" is Seq2SeqDataModule(batch_size=B): shuffled pairs cut into batches of B;
"bucketed" is Seq2SeqDataModule(max_tokens=M) with M the smallest budget whose batches hold B pairs or more on
average, so both feed about as many pairs per step. Two sets of pairs: the shipped Bible fr-en training split,
tokenized as conf/mt/bible_fr_en.yaml does (joint 4k vocabulary, 128-token limits, batch 32), and synthetic
pairs with WMT'14 En-De-like lengths (see `wmt_like_lengths`) at the WMT configs' batch of 128.
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import numpy as np
import torch

from benchmarks.common import machine
from lit_iiet.data.seq2seq import token_batches


def padded_fraction(src: np.ndarray, tgt: np.ndarray, batches: list[np.ndarray]) -> float:
    """Pad tokens / all tokens of the padded source and target tensors of these batches."""
    real = sum(int(src[b].sum() + tgt[b].sum()) for b in batches)
    padded = sum(len(b) * int(src[b].max() + tgt[b].max()) for b in batches)
    return 1 - real / padded


def padding_fractions(src_lens, tgt_lens, batch_size: int, seed: int = 0) -> dict:
    """Padding of random batches of batch_size pairs and of token-budget batches with as many pairs on average.

    Args:
        src_lens: Source row length of each pair (with eos).
        tgt_lens: Target row length of each pair (target + 1, for bos / eos).
        batch_size: Pairs per random batch; the budget is the smallest giving at least this mean per batch.
        seed: Seed of the random batches and of the bucketing's tie-break.

    Returns:
        {"random": fraction, "bucketed": fraction, "max_tokens": budget, "pairs_per_batch": mean pairs per
        bucketed batch, "seconds": time of one token_batches call at that budget}.
    """
    src, tgt = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
    n = len(src)
    perm = np.random.default_rng(seed).permutation(n)
    random_batches = [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]  # drop_last, as today
    # Fewer batches for a larger budget: bisect for the smallest budget with n / batches >= batch_size.
    lo, hi = int(np.maximum(src, tgt).max()), int(np.maximum(src, tgt).max()) * batch_size
    while lo < hi:
        mid = (lo + hi) // 2
        if n / len(token_batches(src, tgt, mid, seed)) >= batch_size:
            hi = mid
        else:
            lo = mid + 1
    start = time.perf_counter()
    bucketed = token_batches(src, tgt, lo, seed)
    seconds = time.perf_counter() - start
    return {
        "random": padded_fraction(src, tgt, random_batches),
        "bucketed": padded_fraction(src, tgt, bucketed),
        "max_tokens": lo,
        "pairs_per_batch": n / len(bucketed),
        "seconds": seconds,
    }


def wmt_like_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic WMT'14 En-De-like pair lengths in subword tokens: source log-normal (median 25, sigma 0.6:
    mean about 30, 1 in 10^4 beyond 230), capped at 250; target = source x a log-normal ratio (median 1.05,
    sigma 0.2), capped at 250. Rows: source + eos, target + 1."""
    rng = np.random.default_rng(seed)
    src = np.clip(np.rint(rng.lognormal(np.log(25), 0.6, n)), 1, 250).astype(np.int64)
    tgt = np.clip(np.rint(src * rng.lognormal(np.log(1.05), 0.2, n)), 1, 250).astype(np.int64)
    return src + 1, tgt + 1


def bible_lengths() -> tuple[np.ndarray, np.ndarray]:
    """Row lengths of the shipped Bible training split under conf/mt/bible_fr_en.yaml's data settings."""
    from lit_iiet.data import TranslationDataModule

    dm = TranslationDataModule(vocab_size=4000, max_src_len=128, max_tgt_len=128)
    dm.prepare_data()
    dm.setup()
    return dm.datasets["train"].lengths()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wmt_pairs", type=int, default=200_000, help="synthetic WMT-like pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sets = {
        "Bible fr-en train": (bible_lengths(), 32),
        "synthetic WMT'14-like": (wmt_like_lengths(args.wmt_pairs, args.seed), 128),
    }
    print(
        f"Padding of one training epoch's batches, {date.today()}; token_batches timed on "
        f"{machine(torch.device('cpu'))}.\n"
    )
    print(
        "| pairs | n | mean src / tgt rows | batch_size | padding, random | max_tokens | pairs / batch "
        "| padding, bucketed | bucketing time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ((src, tgt), batch_size) in sets.items():
        r = padding_fractions(src, tgt, batch_size, args.seed)
        print(
            f"| {name} | {len(src)} | {src.mean():.1f} / {tgt.mean():.1f} | {batch_size} | {r['random']:.1%} | "
            f"{r['max_tokens']} | {r['pairs_per_batch']:.1f} | {r['bucketed']:.1%} | {r['seconds']:.2f} s |"
        )


if __name__ == "__main__":
    main()
