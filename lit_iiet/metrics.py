"""Corpus scores on detokenised text: BLEU and chrF with sacrebleu, ROUGE-1/2/Lsum with rouge-score; and the
tokenized, compound-split BLEU that WMT'14 En-De papers report, for comparison with them."""

from __future__ import annotations

import re

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

# fairseq's compound_split_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'
COMPOUND = re.compile(r"(\S)-(\S)")


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict[str, float | str]:
    """Corpus BLEU (13a tokenisation, mixed case) and chrF, one reference per segment, with both signatures."""
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def compound_split(text: str) -> str:
    """Splits hyphenated compounds, X-Y -> X ##AT##-##AT## Y, as the script's perl substitution does: matches do not
    overlap, so a-b-c becomes a ##AT##-##AT## b-c there and here."""
    return COMPOUND.sub(r"\1 ##AT##-##AT## \2", text)


def compound_split_bleu(hypotheses: list[str], references: list[str]) -> dict[str, float | str]:
    """Tokenized BLEU with hyphenated compounds split, as the IIET / ODE Transformer papers score WMT'14 En-De
    (fairseq's compound_split_bleu.sh, then multi-bleu): both sides tokenized (here with sacrebleu's 13a, not
    Moses; see docs/SEQ2SEQ.md), `compound_split`, then case-sensitive corpus BLEU over whitespace tokens without
    smoothing (multi-bleu.perl's formula). For comparison with papers only; `bleu_chrf` is the score to report."""
    tokenize = Tokenizer13a()
    hyps = [compound_split(tokenize(h)) for h in hypotheses]
    refs = [compound_split(tokenize(r)) for r in references]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    score = bleu.corpus_score(hyps, [refs])
    return {
        "bleu_compound_split": score.score,
        "bleu_compound_split_signature": f"pre:13a+compound_split|{bleu.get_signature()}",
    }


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/Lsum F1 x 100 (Porter stemming). Sentences are separated by newlines, as rougeLsum needs."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)  # rouge-score's order: target first
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100 * value / max(1, len(hypotheses)) for key, value in totals.items()}
