"""Autoregressive generation over the KV cache: greedy and temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from logits (B, V). temperature 0 means greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens ranked above it already cover top_p; the best token always stays.
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue prompt (B, T) by up to max_new_tokens tokens; rows that emit eos_id are padded with it.

    `model(idx, cache, pos)` returns logits and `model.init_cache(batch, max_len)` an empty cache. Without the
    cache every step reruns the whole sequence: slow, but the reference the cached path must equal.
    """
    B, T = prompt.shape
    total = T + max_new_tokens
    cache = model.init_cache(B, total) if use_cache else None
    tokens = prompt
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    pos = 0
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(tokens[:, pos:], cache, pos)[:, -1]
            pos = tokens.shape[1]
        else:
            logits = model(tokens)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return tokens
