"""Beam search for the encoder-decoder with a tokenizer: its settings (`BeamConfig`, the model's `decoding`), and
sources in, detokenised texts out. Validation, test, `predict` and `generate_text` all decode through here."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from lit_iiet.data.seq2seq import collate_sources, encode_sources, source_batches
from lit_iiet.data.tokenizer import Tokenizer
from lit_iiet.errors import UserInputError
from lit_iiet.nn.generate import beam_search
from lit_iiet.nn.seq2seq import Seq2Seq


@dataclass
class BeamConfig:
    """Decoding settings for validation, test and predict."""

    beam: int = 4
    """Beam size; 1 is greedy decoding."""
    lenpen: float = 1.0
    """Length penalty: hypotheses are ranked by log-probability / length ** lenpen."""
    max_len_a: float = 1.2
    """Maximum output length is max_len_a * source length + max_len_b tokens."""
    max_len_b: int = 10
    """See max_len_a."""
    min_len: int = 1
    """Minimum output length in tokens (eos is forbidden before it)."""
    no_repeat_ngram: int = 0
    """Forbid repeating any n-gram of this size (0: off)."""


def check_decoding(decoding: BeamConfig) -> None:
    """One-line errors for decoding settings that beam search cannot run with."""
    if decoding.beam < 1:
        raise UserInputError(f"decoding.beam={decoding.beam} must be >= 1")
    if decoding.min_len < 0 or decoding.no_repeat_ngram < 0:
        raise UserInputError(
            f"decoding.min_len={decoding.min_len} and decoding.no_repeat_ngram={decoding.no_repeat_ngram} must be >= 0"
        )


def replace_decoding(decoding: BeamConfig, **overrides) -> BeamConfig:
    """A copy of `decoding` with some settings replaced (e.g. beam=5), checked; `decoding` stays as it is."""
    names = [f.name for f in fields(BeamConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserInputError(f"unknown decoding setting {unknown[0]!r}; choose from {', '.join(names)}")
    decoding = replace(decoding, **overrides)
    check_decoding(decoding)
    return decoding


@torch.no_grad()
def decode(
    net: Seq2Seq, tokenizer: Tokenizer, src: torch.Tensor, src_mask: torch.Tensor, decoding: BeamConfig
) -> list[str]:
    """Beam search (greedy at beam 1) for a padded batch of sources; detokenised output text."""
    tok, d = tokenizer, decoding
    src_len = src_mask.sum(1).float()
    max_len = (d.max_len_a * src_len + d.max_len_b).long().clamp(max=net.cfg.max_tgt_len - 1)
    ids = beam_search(
        net.decoder_for(src, src_mask),
        src.shape[0],
        tok.bos_id,
        tok.eos_id,
        max_len,
        d.beam,
        d.min_len,
        d.lenpen,
        d.no_repeat_ngram,
        banned_ids=(tok.pad_id, tok.bos_id),
    )
    return [tok.decode(seq) for seq in ids]


def decode_batch(net: Seq2Seq, tokenizer: Tokenizer, batch: dict, decoding: BeamConfig) -> dict[int, str]:
    """{input position: output text} for a batch of `collate_sources`, on the network's device."""
    device = next(net.parameters()).device
    texts = decode(net, tokenizer, batch["src"].to(device), batch["src_mask"].to(device), decoding)
    return dict(zip(batch["index"].tolist(), texts))


def decode_texts(
    net: Seq2Seq,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    decoding: BeamConfig,
    batch_size: int,
    long_source: str,
) -> list[str]:
    """Outputs for a list of texts, in their order: tokenized (at most net.cfg.max_src_len tokens; longer sources
    as `long_source` says), decoded in length-sorted batches of batch_size, as `predict` batches its sources."""
    ids = encode_sources(sources, tokenizer, net.cfg.max_src_len, long_source, "given", "source", "long_source")
    outputs: dict[int, str] = {}
    for indices in source_batches([len(s) for s in ids], batch_size):
        batch = collate_sources(indices.tolist(), ids, tokenizer.pad_id)
        outputs.update(decode_batch(net, tokenizer, batch, decoding))
    return [outputs[i] for i in range(len(ids))]
