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

    `model(idx, cache, pos, last_only)` returns logits and `model.init_cache(batch, max_len)` an empty cache. Without the
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
            logits = model(tokens[:, pos:], cache, pos, last_only=True)[:, -1]
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


def banned_ngram_tokens(rows: list[list[int]], n: int) -> list[set[int]]:
    """For each row, the tokens that would complete an n-gram already present in it (no-repeat-n-gram)."""
    banned = []
    for seq in rows:
        prefix, hits = tuple(seq[len(seq) - n + 1 :]), set()
        if len(seq) >= n:
            for i in range(len(seq) - n + 1):
                if tuple(seq[i : i + n - 1]) == prefix:
                    hits.add(seq[i + n - 1])
        banned.append(hits)
    return banned


@torch.no_grad()
def beam_search(
    model,
    batch: int,
    bos_id: int,
    eos_id: int,
    max_len: Tensor,
    beam: int = 5,
    min_len: int = 1,
    lenpen: float = 1.0,
    no_repeat_ngram: int = 0,
    banned_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Beam search over the KV cache; returns each sentence's best hypothesis (token ids, without bos/eos).

    `model` is a decoder bound to its sources (`Seq2Seq.decoder_for`): `model(idx, cache, pos)`, `init_cache` and
    `expand(beam)`. Hypotheses are ranked by summed log-probability divided by
    length ** lenpen (length counts the eos), as in fairseq. max_len (B,) caps each sentence's length, where
    eos is forced; min_len forbids eos before it. An eos is only accepted among the `beam` best candidates of
    a step, so beam = 1 is exactly greedy decoding.
    """
    K, device = beam, max_len.device
    model = model.expand(K)
    N = batch * K
    cache = model.init_cache(N, int(max_len.max()) + 1)
    tokens = torch.full((N, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    row_max_len = max_len.repeat_interleave(K)
    for step in range(int(max_len.max()) + 1):
        lprobs = model(tokens[:, -1:], cache, step)[:, -1].float().log_softmax(-1)
        for token in banned_ids:
            lprobs[:, token] = float("-inf")
        if step < min_len:
            lprobs[:, eos_id] = float("-inf")
        at_max = row_max_len <= step
        if at_max.any():  # force eos
            eos_lp = lprobs[at_max, eos_id].clone()
            lprobs[at_max] = float("-inf")
            lprobs[at_max, eos_id] = eos_lp
        if no_repeat_ngram > 0:
            for row, ban in enumerate(banned_ngram_tokens(tokens.tolist(), no_repeat_ngram)):
                if ban:
                    lprobs[row, list(ban)] = float("-inf")
        V = lprobs.shape[-1]
        candidates = (scores.view(N, 1) + lprobs).view(batch, K * V)
        cand_scores, cand_index = (t.tolist() for t in candidates.topk(2 * K, dim=-1))
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            keep: list[tuple[int, int, float]] = []
            for rank in range(2 * K):
                score, index = cand_scores[b][rank], cand_index[b][rank]
                row, token = b * K + index // V, index % V
                if done[b] or score == float("-inf"):
                    break
                if token == eos_id:
                    if rank < K and len(finished[b]) < K:
                        finished[b].append((score / (step + 1) ** lenpen, tokens[row, 1:].tolist()))
                elif len(keep) < K:
                    keep.append((row, token, score))
            if len(finished[b]) >= K or not keep:
                done[b] = True
            keep += [(b * K, eos_id, float("-inf"))] * (K - len(keep))  # dead beams keep the shapes fixed
            for row, token, score in keep:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        if all(done):
            break
        # Beams only ever move within their sentence's group of rows, and those rows share one source: the
        # encoder side needs no reordering, only the self-attention cache (its filled prefix).
        rows = torch.tensor(next_rows, device=device)
        for slots in cache:
            for slot in slots:
                slot.reorder(rows, step + 1)
        tokens = torch.cat((tokens.index_select(0, rows), torch.tensor(next_tokens, device=device)[:, None]), dim=1)
        scores = torch.tensor(next_scores, device=device).view(batch, K)
    return [max(hyps)[1] if hyps else [] for hyps in finished]
