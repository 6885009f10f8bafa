"""Encoder-decoder Transformer (pre-norm, WMT-style) whose encoder and decoder layers follow ODE schemes.

As in the ODE Transformer and PCformer, the encoder layers are integrated by the chosen scheme and the decoder
stays vanilla by default; `dec_ode` lets the decoder iterate too. Self-attention uses RoPE; cross-attention
reads the encoder output. The KV cache has one self-attention slot per (decoder layer, F-evaluation); the
cross-attention keys and values depend only on the source, so they are computed once per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lit_iiet.errors import UserInputError, check_choices
from lit_iiet.nn.layers import (
    Attention,
    KVCache,
    ReluFFN,
    RMSNorm,
    SwiGLU,
    cross_attention,
    feed_forward,
    gpt2_init,
    linear_weights,
    rope_tables,
    self_attention,
)
from lit_iiet.nn.ode import SCHEMES, Branch, ODEConfig


@dataclass
class Seq2SeqConfig:
    """Shape of an encoder-decoder Transformer (defaults: Transformer-base)."""

    vocab_size: int = 32000
    """Rows of the (joint) embedding; at least the tokenizer's vocabulary size."""
    d_model: int = 512
    """Hidden size."""
    n_heads: int = 8
    """Attention heads."""
    enc_layers: int = 6
    """Encoder layers (each one ODE step of enc_ode)."""
    dec_layers: int = 6
    """Decoder layers (each one ODE step of dec_ode)."""
    d_ff: int = 2048
    """Feed-forward hidden size."""
    ffn: Literal["relu", "swiglu"] = "relu"
    """Feed-forward net: relu (the original Transformer, with biases) or swiglu."""
    dropout: float = 0.1
    """Dropout on embeddings, attention weights and every sub-layer output."""
    max_src_len: int = 1024
    """Longest source the model accepts (RoPE table size)."""
    max_tgt_len: int = 1024
    """Longest target the model accepts."""
    tie_output: bool = True
    """Share the output projection with the (joint) embedding."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init: Literal["torch", "gpt2"] = "torch"
    """Initial weights of the layers: torch (nn.Linear's default, uniform within 1 / sqrt(fan_in)) or gpt2 (N(0, 0.02),
    biases 0, the projections into the residual stream N(0, 0.02 / sqrt(writes)) with 2 writes per encoder layer
    and 3 per decoder layer: much smaller first updates). The embedding is N(0, 1 / d_model) either way."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UserInputError(
                f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size (RoPE)"
            )
        check_choices(self)
        for name in ("vocab_size", "enc_layers", "dec_layers", "d_ff", "max_src_len", "max_tgt_len"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 1")


def _ffn(cfg: Seq2SeqConfig) -> nn.Module:
    return ReluFFN(cfg.d_model, cfg.d_ff) if cfg.ffn == "relu" else SwiGLU(cfg.d_model, cfg.d_ff)


class EncoderBlock(nn.Module):
    """G(z) = a + FFN(N2(z + a)) with a = bidirectional self-attention over the unpadded source."""

    def __init__(self, cfg: Seq2SeqConfig, ode: ODEConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.dropout)
        self.ffn = _ffn(cfg)
        self.branch_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if ode.branch_norm else None
        self.dropout, self.shared_mask = cfg.dropout, ode.dropout_mask == "layer"

    def branch(self, cos: Tensor, sin: Tensor, src_mask: Tensor) -> Branch:
        d, training, shared = self.dropout, self.training, self.shared_mask
        attn, _ = self_attention(
            self.attn, self.norm1, cos, sin, d, training, causal=False, key_mask=src_mask, shared_mask=shared
        )
        return Branch([attn, feed_forward(self.ffn, self.norm2, d, training, shared)], self.branch_norm)


class DecoderBlock(nn.Module):
    """G(z) = a + c + FFN(N3(z + a + c)): causal self-attention a, cross-attention c to the encoder output."""

    def __init__(self, cfg: Seq2SeqConfig, ode: ODEConfig) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (RMSNorm(cfg.d_model, cfg.norm_eps) for _ in range(3))
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.dropout)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.dropout, cross=True)
        self.ffn = _ffn(cfg)
        self.branch_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if ode.branch_norm else None
        self.dropout, self.shared_mask = cfg.dropout, ode.dropout_mask == "layer"

    def branch(self, cos, sin, memory_kv, src_mask, caches: list[KVCache] | None, pos: int) -> Branch:
        """G for the target tokens at [pos, pos + T); evaluation e reads and writes self-attention slot caches[e]."""
        d, training, shared = self.dropout, self.training, self.shared_mask
        self_attn, _ = self_attention(
            self.self_attn, self.norm1, cos, sin, d, training, caches, pos, shared_mask=shared
        )
        cross_attn = cross_attention(self.cross_attn, self.norm2, memory_kv, src_mask, d, training, shared)
        ffn = feed_forward(self.ffn, self.norm3, d, training, shared)
        return Branch([self_attn, cross_attn, ffn], self.branch_norm)


class Seq2Seq(nn.Module):
    """(source ids, source mask, target ids) -> next-token logits over the joint vocabulary."""

    def __init__(self, cfg: Seq2SeqConfig, enc_ode: ODEConfig, dec_ode: ODEConfig) -> None:
        super().__init__()
        self.cfg, self.enc_ode, self.dec_ode = cfg, enc_ode, dec_ode
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5)  # scaled by sqrt(d_model) in embed_tokens
        self.encoder = nn.ModuleList(EncoderBlock(cfg, enc_ode) for _ in range(cfg.enc_layers))
        self.enc_update = SCHEMES[enc_ode.scheme](enc_ode, cfg.enc_layers, cfg.d_model)
        self.enc_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(cfg, dec_ode) for _ in range(cfg.dec_layers))
        self.dec_update = SCHEMES[dec_ode.scheme](dec_ode, cfg.dec_layers, cfg.d_model)
        self.dec_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.init == "gpt2":
            gpt2_init(self.encoder, 2 * cfg.enc_layers)
            gpt2_init(self.decoder, 3 * cfg.dec_layers)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_output:
            self.out.weight = self.embed.weight
        cos, sin = rope_tables(max(cfg.max_src_len, cfg.max_tgt_len), cfg.d_model // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def embed_tokens(self, idx: Tensor) -> Tensor:
        return F.dropout(self.embed(idx) * math.sqrt(self.cfg.d_model), self.cfg.dropout, self.training)

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """Source ids (B, S), right-padded, with src_mask True on real tokens -> encoder output (B, S, C)."""
        S = src.shape[1]
        if S > self.cfg.max_src_len:
            raise UserInputError(f"source of {S} tokens is longer than max_src_len={self.cfg.max_src_len}")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = self.embed_tokens(src)
        history = self.enc_update.begin(x)
        for layer, block in enumerate(self.encoder):
            x = self.enc_update(layer, x, block.branch(cos, sin, src_mask), history)
        return self.enc_norm(x)

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys and values of every decoder layer, computed once per source."""
        return [block.cross_attn.memory_kv(memory) for block in self.decoder]

    def decode(
        self,
        tgt: Tensor,
        memory_kv,
        src_mask: Tensor,
        cache: list[list[KVCache]] | None = None,
        pos: int = 0,
        last_only: bool = False,
    ) -> Tensor:
        """Target ids (B, T) at positions [pos, pos + T) -> logits (B, T, V)."""
        T = tgt.shape[1]
        if pos + T > self.cfg.max_tgt_len:
            raise UserInputError(f"target of {pos + T} tokens is longer than max_tgt_len={self.cfg.max_tgt_len}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.embed_tokens(tgt)
        history = self.dec_update.begin(x)
        for layer, block in enumerate(self.decoder):
            G = block.branch(cos, sin, memory_kv[layer], src_mask, cache[layer] if cache is not None else None, pos)
            x = self.dec_update(layer, x, G, history)
        return self.out(self.dec_norm(x[:, -1:] if last_only else x))

    def forward(self, src: Tensor, src_mask: Tensor, tgt: Tensor) -> Tensor:
        """Teacher-forced logits for the target inputs tgt (B, T)."""
        return self.decode(tgt, self.memory_kv(self.encode(src, src_mask)), src_mask)

    def flops(self, batch: int, src_len: int, tgt_len: int) -> int:
        """Matmul FLOPs of one teacher-forced forward pass over padded (batch, src_len) and (batch, tgt_len).

        Every F-evaluation of both stacks is counted; cross-attention keys and values are computed once per
        layer, not per evaluation. Same conventions as `Decoder.flops`.
        """
        d, S, T = self.cfg.d_model, batch * src_len, batch * tgt_len
        enc_eval = 2 * S * linear_weights(self.encoder[0]) + 4 * batch * src_len * src_len * d
        kv = self.decoder[0].cross_attn.kv
        dec_eval = 2 * T * linear_weights(self.decoder[0], skip=(kv,)) + 4 * batch * tgt_len * (tgt_len + src_len) * d
        return (
            self.enc_update.total_evals() * enc_eval
            + self.enc_update.flops(S)
            + self.cfg.dec_layers * 2 * S * kv.weight.numel()
            + self.dec_update.total_evals() * dec_eval
            + self.dec_update.flops(T)
            + 2 * T * self.out.weight.numel()
        )

    def init_cache(self, batch: int, max_len: int) -> list[list[KVCache]]:
        c = self.cfg
        return self.dec_update.init_cache(batch, c.n_heads, max_len, c.d_model // c.n_heads, self.embed.weight)

    def decoder_for(self, src: Tensor, src_mask: Tensor) -> "BoundDecoder":
        """The decoder bound to an encoded source: the `model(idx, cache, pos)` interface of the generation loops."""
        return BoundDecoder(self, self.memory_kv(self.encode(src, src_mask)), src_mask)


class BoundDecoder:
    """A decoder with its source fixed, so that greedy, sampling and beam search treat it like a language model."""

    def __init__(self, model: Seq2Seq, memory_kv, src_mask: Tensor) -> None:
        self.model, self.memory_kv, self.src_mask = model, memory_kv, src_mask

    def __call__(self, idx: Tensor, cache=None, pos: int = 0, last_only: bool = False) -> Tensor:
        return self.model.decode(idx, self.memory_kv, self.src_mask, cache, pos, last_only)

    def init_cache(self, batch: int, max_len: int) -> list[list[KVCache]]:
        return self.model.init_cache(batch, max_len)

    def expand(self, repeats: int) -> "BoundDecoder":
        """Each source repeated for `repeats` beams (rows b*repeats .. b*repeats + repeats - 1)."""
        rep = lambda t: t.repeat_interleave(repeats, dim=0)  # noqa: E731
        return BoundDecoder(self.model, [(rep(k), rep(v)) for k, v in self.memory_kv], rep(self.src_mask))

    def select(self, rows: Tensor) -> "BoundDecoder":
        """The sources of the batch rows `rows` only (beam search drops the rows of finished sentences)."""
        return BoundDecoder(self.model, [(k[rows], v[rows]) for k, v in self.memory_kv], self.src_mask[rows])
