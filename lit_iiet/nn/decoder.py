"""Decoder-only language model in the Transformer++ layout (pre-RMSNorm, RoPE, SwiGLU, no biases).

Every layer is integrated by the scheme of its `ODEConfig`; with scheme "euler" this is the vanilla model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lit_iiet.errors import UserInputError
from lit_iiet.nn.layers import (
    Attention,
    KVCache,
    RMSNorm,
    SwiGLU,
    feed_forward,
    gpt2_init,
    linear_weights,
    rope_tables,
    self_attention,
    swiglu_hidden,
)
from lit_iiet.nn.ode import SCHEMES, Branch, ODEConfig, Scheme


@dataclass
class DecoderConfig:
    """Shape of a decoder-only Transformer++."""

    vocab_size: int = 2048
    """Rows of the embedding and the output head; must be at least the tokenizer's vocabulary size."""
    n_layers: int = 6
    """Number of layers (each one ODE step)."""
    d_model: int = 256
    """Hidden size."""
    n_heads: int = 4
    """Attention heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head attention)."""
    d_ff: int | None = None
    """SwiGLU hidden size; None means LLaMA's 8/3 * d_model rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence (prompt + generated tokens) the model accepts."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    dropout: float = 0.0
    """Dropout on attention weights and on every sub-layer output."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (Transformer++ leaves them untied)."""
    embed_scale: float | str = 1.0
    """Multiplier of the embedding output, i.e. the scale of the stream entering the first layer: a number, or
    sqrt_d_model (Gemma's choice; Llama's is 1). Pre-norm layers read their input through RMSNorm, so G's
    Jacobian grows like 1 / ||z||: an embedding of std 0.02 makes the first layer's fixed-point map expansive
    (docs/DESIGN.md, section 4)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UserInputError(
                f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size (RoPE)"
            )
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            raise UserInputError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.embed_scale == "sqrt_d_model":
            self.embed_scale = math.sqrt(self.d_model)  # checkpoints store the number
        if isinstance(self.embed_scale, str) or not self.embed_scale > 0:
            raise UserInputError(f"embed_scale={self.embed_scale!r} must be a number > 0 or 'sqrt_d_model'")


class Block(nn.Module):
    """One pre-norm layer; it only provides its residual branch G, the scheme decides how to step with it."""

    def __init__(self, cfg: DecoderConfig, ode: ODEConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.dropout)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff or swiglu_hidden(cfg.d_model))
        self.branch_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if ode.branch_norm else None
        self.dropout, self.shared_mask = cfg.dropout, ode.dropout_mask == "layer"

    def branch(
        self,
        cos: Tensor,
        sin: Tensor,
        caches: list[KVCache] | None,
        pos: int,
        checkpoint: bool = False,
        shared_kv: bool = False,
    ) -> Branch:
        """G for the tokens at [pos, pos + T); evaluation e reads and writes cache slot caches[e].

        shared_kv: every evaluation attends to the keys and values of evaluation 0 (one cache slot per layer).
        """
        d, training, shared = self.dropout, self.training, self.shared_mask
        attn, fill = self_attention(
            self.attn, self.norm1, cos, sin, d, training, caches, pos, shared_kv=shared_kv, shared_mask=shared
        )
        ffn = feed_forward(self.ffn, self.norm2, d, training, shared)
        decoding = caches is not None
        return Branch([attn, ffn], self.branch_norm, checkpoint, fill if decoding else None, decoding)

    def forward(
        self,
        x: Tensor,
        layer: int,
        update: Scheme,
        history: list[Tensor] | None,
        cos: Tensor,
        sin: Tensor,
        caches: list[KVCache] | None,
        pos: int,
        checkpoint: bool = False,
        shared_kv: bool = False,
    ) -> Tensor:
        """The layer's whole step, all its F-evaluations, inside this module's forward: a wrapper that hooks
        forward (FSDP gathers the block's sharded parameters there) sees every use of the weights."""
        G = self.branch(cos, sin, caches, pos, checkpoint, shared_kv)
        return update(layer, x, G, history)


def check_checkpointing(mode: str, update: Scheme) -> None:
    """Activation checkpointing while training: "none", "layer" (keep each layer's input, recompute the layer with
    all its evaluations in the backward pass) or "iteration" (keep each F-evaluation's input, recompute one G)."""
    if mode not in ("none", "layer", "iteration"):
        raise UserInputError(f"activation_checkpointing={mode!r}; choose 'none', 'layer' or 'iteration'")
    if mode == "layer" and update.stateful:  # recomputing one layer would extend the pass's state (history) twice
        raise UserInputError(
            f"activation_checkpointing='layer' does not support scheme {update.cfg.scheme!r}; use 'iteration'"
        )


def next_token_loss(logits: Tensor, windows: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (B, T, V), computed on windows[:, :-1], against the next tokens windows[:, 1:]
    (B, T + 1): the language-modelling loss, in fp32 whatever the logits' precision."""
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction=reduction)


class Decoder(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: DecoderConfig, ode: ODEConfig) -> None:
        super().__init__()
        self.cfg, self.ode = cfg, ode
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, ode) for _ in range(cfg.n_layers))
        self.update = SCHEMES[ode.scheme](ode, cfg.n_layers, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        gpt2_init(self, 2 * cfg.n_layers)

    @property
    def schedule(self) -> list[int]:
        return self.update.schedule

    def flops(self, batch: int, seq_len: int) -> int:
        """Matmul FLOPs of one forward pass over (batch, seq_len) tokens, every F-evaluation counted.

        Attention counts the full T x T score matrix, as torch's FlopCounterMode does (and as MFU conventions do);
        a training step costs about 3x this (the backward pass computes two matmuls per forward matmul).
        """
        tokens, d = batch * seq_len, self.cfg.d_model
        per_eval = 2 * tokens * linear_weights(self.blocks[0]) + 4 * batch * seq_len * seq_len * d
        return (
            self.update.total_evals() * per_eval + self.update.flops(tokens) + 2 * tokens * self.lm_head.weight.numel()
        )

    def init_cache(self, batch: int, max_len: int | None = None) -> list[list[KVCache]]:
        """Empty KV cache: one slot per (layer, F-evaluation)."""
        c = self.cfg
        return self.update.init_cache(
            batch, c.n_kv_heads or c.n_heads, max_len or c.max_seq_len, c.d_model // c.n_heads, self.embed.weight
        )

    def hidden(
        self, idx: Tensor, cache: list[list[KVCache]] | None = None, pos: int = 0, checkpointing: str = "none"
    ) -> Tensor:
        """Final-norm hidden states of the tokens idx placed at positions [pos, pos + T).

        checkpointing: activation checkpointing while training (see `check_checkpointing`).
        """
        T = idx.shape[1]
        if pos + T > self.cfg.max_seq_len:
            raise UserInputError(f"sequence of {pos + T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.embed(idx)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        x = F.dropout(x, self.cfg.dropout, self.training)
        history = self.update.begin(x)
        mode = checkpointing if self.training and torch.is_grad_enabled() else "none"
        check_checkpointing(mode, self.update)
        shared_kv = self.ode.shared_kv
        for layer, block in enumerate(self.blocks):
            args = (x, layer, self.update, history, cos, sin, cache[layer] if cache is not None else None, pos)
            if mode == "layer":
                x = torch.utils.checkpoint.checkpoint(block, *args, False, shared_kv, use_reentrant=False)
            else:
                x = block(*args, mode == "iteration", shared_kv)
        return self.norm(x)

    def forward(
        self,
        idx: Tensor,
        cache: list[list[KVCache]] | None = None,
        pos: int = 0,
        last_only: bool = False,
        checkpointing: str = "none",
    ) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) of the last position with last_only (generation's prefill)."""
        h = self.hidden(idx, cache, pos, checkpointing)
        return self.lm_head(h[:, -1:] if last_only else h)
