"""Corpus scores on detokenised text: BLEU and chrF with sacrebleu, ROUGE-1/2/Lsum with rouge-score."""

from __future__ import annotations

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF


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


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/Lsum F1 x 100 (Porter stemming). Sentences are separated by newlines, as rougeLsum needs."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)  # rouge-score's order: target first
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100 * value / max(1, len(hypotheses)) for key, value in totals.items()}
