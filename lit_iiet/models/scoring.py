"""Scoring the encoder-decoder's validation and test outputs: gathered from every rank, scored with BLEU / chrF or
ROUGE (lit_iiet.metrics), shown as TensorBoard samples, and written next to the logs with a printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from lit_iiet.metrics import bleu_chrf, compound_split_bleu, rouge

Output = tuple[int, str, str]
"""One decoded item: (index in its split, hypothesis, reference)."""


def gather_outputs(outputs: list[Output]) -> list[Output]:
    """The outputs of every rank, each item once, in item order. Under DDP a collective: call it on all ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, outputs)
        outputs = [o for part in parts for o in part]
    return sorted(set(outputs))  # DDP samplers may repeat a few items to even out the ranks


def score_outputs(outputs: Sequence[Output], task: str, with_compound_split_bleu: bool) -> dict[str, float | str]:
    """BLEU and chrF (translation) or ROUGE (summarization) of the hypotheses against the references, with the
    compound-split BLEU of the papers when asked; BLEU / chrF come with their signatures."""
    hyps, refs = [h for _, h, _ in outputs], [r for _, _, r in outputs]
    scores = bleu_chrf(hyps, refs) if task == "translation" else rouge(hyps, refs)
    if with_compound_split_bleu:
        scores.update(compound_split_bleu(hyps, refs))
    return scores


def samples_markdown(samples: Sequence[tuple[int, str, str, str]]) -> str:
    """(index, source, reference, hypothesis) triples as TensorBoard markdown, verbatim in code blocks."""
    return "\n\n".join(
        f"**#{i}**\n\n```\nsource:     {src}\nreference:  {ref}\nhypothesis: {hyp}\n```" for i, src, ref, hyp in samples
    )


def write_test_files(out_dir: Path, outputs: Sequence[Output], texts: Sequence[tuple[str, str]]) -> None:
    """test.hyp.txt, test.ref.txt and test.src.txt in out_dir, one segment per line in item order, to rescore with
    the sacrebleu CLI. texts: the (source, target) texts of the test split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "test.hyp.txt": [h for _, h, _ in outputs],
        "test.ref.txt": [r for _, _, r in outputs],
        "test.src.txt": [texts[i][0] for i, _, _ in outputs],
    }
    for name, lines in files.items():
        (out_dir / name).write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")


def summarize_test(scores: dict, segments: int, out_dir: Path) -> str:
    """The lines printed after `test`: the scores, the signatures of BLEU / chrF, and where the files are."""
    s = scores
    if "bleu" not in s:
        return (
            f"test ROUGE-1 = {s['rouge1']:.2f}  ROUGE-2 = {s['rouge2']:.2f}  ROUGE-Lsum = {s['rougeLsum']:.2f}  "
            f"({segments} documents; rouge-score, Porter stemmer)\n  hypotheses: {out_dir / 'test.hyp.txt'}"
        )
    text = (
        f"test BLEU = {s['bleu']:.2f}  chrF = {s['chrf']:.2f}  ({segments} segments)\n"
        f"  BLEU signature: {s['bleu_signature']}\n  chrF signature: {s['chrf_signature']}\n"
        f"  hypotheses: {out_dir / 'test.hyp.txt'}  references: {out_dir / 'test.ref.txt'}"
    )
    if "bleu_compound_split" in s:
        text += (
            f"\ntest compound-split BLEU = {s['bleu_compound_split']:.2f}  (tokenized, for comparison with papers; docs/SEQ2SEQ.md)\n"
            f"  signature: {s['bleu_compound_split_signature']}"
        )
    return text
