"""The OLD beam search (before the tensorized one in lit_iiet/nn/generate.py), kept as the reference oracle.

Tests and `benchmarks.beam_search` check that the new search returns the same hypotheses and scores as this
one. It is the code that shipped until then, unchanged but for three things: the cache reorder it called
(`KVCache.reorder(rows, length)`, an in-place gather of every slot's filled prefix) is written out here, the
n-gram helper lives here, and `with_scores` also returns each best hypothesis's score. Do not use it for
decoding: it moves scores to the host and loops over sentences x candidates in Python at every step.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
def reference_beam_search(
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
    with_scores: bool = False,
):
    """The old `lit_iiet.nn.generate.beam_search` (same arguments); with_scores: also the best scores (-inf if none)."""
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
            for slot in slots:  # the old KVCache.reorder(rows, step + 1)
                slot.k[:, :, : step + 1] = slot.k[:, :, : step + 1].index_select(0, rows)
                slot.v[:, :, : step + 1] = slot.v[:, :, : step + 1].index_select(0, rows)
        tokens = torch.cat((tokens.index_select(0, rows), torch.tensor(next_tokens, device=device)[:, None]), dim=1)
        scores = torch.tensor(next_scores, device=device).view(batch, K)
    best = [max(hyps) if hyps else (float("-inf"), []) for hyps in finished]
    return ([hyp for _, hyp in best], [score for score, _ in best]) if with_scores else [hyp for _, hyp in best]
