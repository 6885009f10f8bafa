"""Building blocks shared by every model: RMSNorm, RoPE, attention with a KV cache, feed-forward nets, and the
sub-layer builders from which every block makes its residual branch G.

One attention and one cache serve every scheme and both model families. The cache holds one slot per
(layer, F-evaluation): see `KVCache`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too much precision.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(max_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (max_len, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, D) by the angles of cos/sin (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class KVCache(nn.Module):
    """Keys and values of one (layer, F-evaluation) for every position decoded so far.

    Buffers are preallocated to `max_len`; `forward` writes the new keys/values at `pos` and returns the
    prefix [0, pos + T) to attend over. Because each F-evaluation of a layer gets its own slot, the attention
    of evaluation e reads keys computed from every token's input to evaluation e, exactly as in the
    full-sequence forward (docs/DESIGN.md, section 3: the KV-cache rule).
    """

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        shape = (batch, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.spare: tuple[Tensor, Tensor] | None = None  # reorder's second buffer (doubles the cache's memory)

    def forward(self, pos: int, k: Tensor, v: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B', H, T, D) at [pos, pos + T) of the batch rows `rows` (all if None); return the prefix."""
        end = pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; decoding position {end - 1} does not fit")
        if rows is None:
            self.k[:, :, pos:end] = k
            self.v[:, :, pos:end] = v
        else:
            self.k[rows, :, pos:end] = k
            self.v[rows, :, pos:end] = v
        return self.prefix(end, rows)

    def prefix(self, end: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values of positions [0, end), of the batch rows `rows` (gathered: a copy) or of all rows."""
        if rows is None:
            return self.k[:, :, :end], self.v[:, :, :end]
        return self.k[rows, :, :end], self.v[rows, :, :end]

    def reorder(self, index: Tensor, length: int, moved: Tensor | None = None) -> None:
        """Rows <- rows[index] over the filled positions [0, length): beam search keeps its surviving hypotheses.
        An index shorter than the batch keeps only the rows it names (finished sentences leave).

        moved: the rows i with index[i] != i, when the caller knows them. A beam mostly extends itself, so few
        rows move at a step, and only those are copied. When many move (over a fifth of the rows) or rows leave,
        every row is gathered into a second buffer that then becomes the cache (one read and one write, no new
        memory). `python -m benchmarks.beam_search --part reorder` measures the choices (docs/RESULTS.md).
        """
        n = index.shape[0]
        if moved is not None and n == self.k.shape[0] and 5 * moved.numel() <= n:
            if moved.numel():
                source = index[moved]
                for buf in (self.k, self.v):  # the moved rows are read in full before any is written: rows may swap
                    buf[:, :, :length].index_copy_(0, moved, buf[:, :, :length].index_select(0, source))
            return
        if self.spare is None:
            self.spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        k, v = self.spare[0][:n], self.spare[1][:n]  # rows only ever leave, so the old buffer's first n rows fit
        torch.index_select(self.k[:, :, :length], 0, index, out=k[:, :, :length])
        torch.index_select(self.v[:, :, :length], 0, index, out=v[:, :, :length])
        self.spare, self.k, self.v = (self.k, self.v), k, v


class Attention(nn.Module):
    """Multi-head (grouped-query) attention computed by `scaled_dot_product_attention`.

    Self-attention (causal with a KV cache for decoders, or bidirectional over a padded source for encoders)
    rotates queries and keys with RoPE. Cross-attention (cross=True) reads keys and values of an encoder's
    output, computed once by `memory_kv` and reused by every decoding step and every F-evaluation.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model={dim} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        q_size, kv_size = n_heads * self.head_dim, n_kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(dim, q_size, bias=False)
            self.kv = nn.Linear(dim, 2 * kv_size, bias=False)
        else:
            self.qkv = nn.Linear(dim, q_size + 2 * kv_size, bias=False)
        self.proj = nn.Linear(q_size, dim, bias=False)
        self.cross, self.dropout = cross, dropout

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of an encoder output (B, S, C)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)

    def project(
        self, x: Tensor, cos: Tensor, sin: Tensor, queries: bool = True, keys: bool = True
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Self-attention q, k, v of x (B, T, C) in heads, RoPE applied. queries=False skips q (cache filling),
        keys=False skips k and v (attending to a shared KV slot): only those rows of the fused weight are used."""
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        start, end = (0 if queries else q_size), (q_size + 2 * kv_size if keys else q_size)
        # The common case calls the module itself (hooks such as FSDP's or a LoRA wrapper's see it).
        out = self.qkv(x) if queries and keys else F.linear(x, self.qkv.weight[start:end])
        q = apply_rope(self._heads(out[..., :q_size], self.n_heads), cos, sin) if queries else None
        if not keys:
            return q, None, None
        k, v = out[..., end - start - 2 * kv_size :].chunk(2, dim=-1)
        return q, apply_rope(self._heads(k, self.n_kv_heads), cos, sin), self._heads(v, self.n_kv_heads)

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None = None,
        sin: Tensor | None = None,
        cache: KVCache | None = None,
        pos: int = 0,
        key_mask: Tensor | None = None,
        causal: bool = True,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, C), the T new tokens at positions [pos, pos + T); cos/sin already sliced to those positions.

        key_mask: (B, S) bool, True where a key may be attended (source padding). memory_kv: precomputed keys and
        values to attend to instead of x's own (cross-attention; causal self-attention over a shared KV slot).
        rows: the cache's batch rows that x holds, when only some rows are decoded (per-token early exit).
        """
        B, T, _ = x.shape
        if self.cross:
            q, (k, v), causal = self._heads(self.q(x), self.n_heads), memory_kv, False
        elif memory_kv is not None:
            (q, _, _), (k, v) = self.project(x, cos, sin, keys=False), memory_kv
        else:
            q, k, v = self.project(x, cos, sin)
            if cache is not None:
                k, v = cache(pos, k, v, rows)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        dropout = self.dropout if self.training else 0.0
        # No padding and no past (or one new query, which may see every key): SDPA's own masks, or none.
        if key_mask is None and (not causal or T == 1 or k.shape[2] == T):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, dropout_p=dropout)
        else:
            mask = key_mask[:, None, None, :] if key_mask is not None else None
            if causal:  # T new queries after pos cached keys: query i sees keys [0, pos + i]
                tri = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=k.shape[2] - T)
                mask = tri if mask is None else mask & tri
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


# --- sub-layers of a residual branch G -------------------------------------------------------------------------
# Every block (decoder-only, encoder, encoder-decoder's decoder) builds G from these, so norms, dropout, the KV
# cache and per-token early exit work the same way in each. A sub-layer is called as f(z, e, rows=None): e is the
# F-evaluation (its KV-cache slot), rows the batch rows z holds when only some are computed (docs/DESIGN.md, section 3).


def output_dropout(p: float, training: bool, shared_mask: bool = False) -> Callable[[Tensor], Tensor]:
    """Dropout of one sub-layer's output over a layer step's F-evaluations: a fresh mask at every call, or with
    shared_mask the first call's mask reused by the later ones (one mask per layer step)."""
    if not training or p == 0.0:
        return lambda x: x
    if not shared_mask:
        return lambda x: F.dropout(x, p, True)
    masks: list[Tensor] = []

    def drop(x: Tensor) -> Tensor:
        if not masks:
            masks.append(F.dropout(torch.ones_like(x), p, True))
        return x * masks[0]

    return drop


def self_attention(
    attn: Attention,
    norm: nn.Module,
    cos: Tensor,
    sin: Tensor,
    dropout: float,
    training: bool,
    caches: list[KVCache] | None = None,
    pos: int = 0,
    shared_kv: bool = False,
    causal: bool = True,
    key_mask: Tensor | None = None,
    shared_mask: bool = False,
):
    """The self-attention sub-layer dropout(Attn(norm(z))) of the tokens at [pos, pos + T), and its cache filler.

    Evaluation e reads and writes cache slot caches[e]. shared_kv: every evaluation attends to the keys and values
    of evaluation 0 (one cache slot per layer). fill(z, e, rows) writes slot e of the rows `rows` from their
    states z without attending (exact per-token early exit: a stopped token's keys come from its frozen state).
    shared_mask: one output-dropout mask for all evaluations (`output_dropout`).
    """
    first_kv: list[tuple[Tensor, Tensor]] = []  # shared_kv without a cache: evaluation 0's keys and values
    drop = output_dropout(dropout, training, shared_mask)

    def step(z: Tensor, e: int, rows: Tensor | None = None) -> Tensor:
        h = norm(z)
        if shared_kv and e > 0:
            kv = caches[0].prefix(pos + z.shape[1], rows) if caches is not None else first_kv[0]
            out = attn(h, cos, sin, memory_kv=kv)
        elif shared_kv and caches is None:
            _, k, v = attn.project(h, cos, sin, queries=False)
            first_kv.append((k, v))
            out = attn(h, cos, sin, memory_kv=(k, v))
        else:
            cache = caches[e] if caches is not None else None
            mask = key_mask if key_mask is None or rows is None else key_mask[rows]
            out = attn(h, cos, sin, cache, pos, key_mask=mask, causal=causal, rows=rows)
        return drop(out)

    def fill(z: Tensor, e: int, rows: Tensor) -> None:
        _, k, v = attn.project(norm(z), cos, sin, queries=False)
        caches[e](pos, k, v, rows)

    return step, fill


def cross_attention(
    attn: Attention,
    norm: nn.Module,
    memory_kv: tuple[Tensor, Tensor],
    key_mask: Tensor,
    dropout: float,
    training: bool,
    shared_mask: bool = False,
):
    """The cross-attention sub-layer dropout(CrossAttn(norm(z), memory)) over an encoder output's keys and values."""
    drop = output_dropout(dropout, training, shared_mask)

    def step(z: Tensor, e: int, rows: Tensor | None = None) -> Tensor:
        kv, mask = memory_kv, key_mask
        if rows is not None:
            kv, mask = (memory_kv[0][rows], memory_kv[1][rows]), key_mask[rows]
        return drop(attn(norm(z), key_mask=mask, memory_kv=kv))

    return step


def feed_forward(ffn: nn.Module, norm: nn.Module, dropout: float, training: bool, shared_mask: bool = False):
    """The feed-forward sub-layer dropout(FFN(norm(z)))."""
    drop = output_dropout(dropout, training, shared_mask)

    def step(z: Tensor, e: int, rows: Tensor | None = None) -> Tensor:
        return drop(ffn(norm(z)))

    return step


class ReluFFN(nn.Module):
    """The original Transformer's feed-forward net: W2(relu(W1 x + b1)) + b2 (WMT-style encoder-decoders)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.relu(self.w1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward net of Transformer++ / LLaMA: W2(silu(W1 x) * W3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # W1 and W3 fused into one GEMM
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def gpt2_init(stack: nn.Module, residual_writes: int, std: float = 0.02) -> None:
    """GPT-2's initialisation of a stack: every nn.Linear and nn.Embedding weight N(0, std) (but one-row weights
    such as gates and routers, which their schemes initialise), biases 0; then the projections that write into
    the residual stream (attention `proj`, FFN `w2`) N(0, std / sqrt(residual_writes)), so the stream grows alike
    whatever the depth (GPT-2 counts two writes per layer). Draws in `Module.apply` order (a seed's weights stay
    what they were)."""

    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[0] > 1:
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    stack.apply(init)
    for name, p in stack.named_parameters():
        if name.endswith(("attn.proj.weight", "ffn.w2.weight")):
            nn.init.normal_(p, std=std / math.sqrt(residual_writes))


def linear_weights(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Weights of the nn.Linear layers in module: a token passing through all of them costs 2x this in FLOPs."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear) and m not in skip)


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """LLaMA's FFN width: 2/3 of 4*dim, rounded up to a multiple (keeps parameters equal to a 4*dim MLP)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)
