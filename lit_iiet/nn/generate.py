"""Autoregressive generation over the KV cache: greedy, temperature / top-k / top-p sampling, and beam search."""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from lit_iiet.errors import UserInputError


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


def ban_repeated_ngrams(lprobs: Tensor, tokens: Tensor, n: int) -> None:
    """Set lprobs (N, V) to -inf, in place, on each token that would complete an n-gram already in its row of
    tokens (N, T). Every row is scanned at once: windows that end with the row's last n - 1 tokens name the bans."""
    T = tokens.shape[1]
    if T < n:
        return
    windows = tokens.unfold(1, n, 1)  # (N, T - n + 1, n): every n-gram so far
    hit = (windows[:, :, :-1] == tokens[:, None, T - n + 1 :]).all(-1)
    # min(x, +inf) = x leaves the other tokens as they are, whichever window names them.
    ban = torch.where(hit, float("-inf"), float("inf")).to(lprobs.dtype)
    lprobs.scatter_reduce_(1, windows[:, :, -1], ban, "amin")


def top_candidates(cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """cand.topk(k, dim=1) (the same values; indices may differ only between equal values), for wide rows.

    A max over a row is ~20x faster than a topk over it on a CPU, and the k best values of a row lie in the k
    blocks of columns with the largest maxima: so rank the block maxima, then only the columns of those blocks.
    """
    B, W = cand.shape
    block = next((b for b in (64, 32, 16) if W % b == 0 and W // b > 2 * k), None)  # whole vectors for the max
    if block is None:
        return cand.topk(k, dim=1)
    blocks = cand.view(B, W // block, block)
    best = blocks.amax(-1).topk(k, dim=1).indices  # (B, k) block ids
    values, index = blocks.gather(1, best[:, :, None].expand(B, k, block)).view(B, k * block).topk(k, dim=1)
    return values, best.gather(1, index // block) * block + index % block


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
    with_scores: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Beam search over the KV cache; returns each sentence's best hypothesis (token ids, without bos/eos).

    `model` is a decoder bound to its sources (`Seq2Seq.decoder_for`): `model(idx, cache, pos)`, `init_cache`,
    `expand(beam)` and `select(rows)`. Hypotheses are ranked by summed log-probability divided by
    length ** lenpen (length counts the eos), as in fairseq. max_len (B,) caps each sentence's length, where
    eos is forced; min_len forbids eos before it; banned_ids are never emitted; no_repeat_ngram > 0 forbids
    repeating an n-gram of that size. An eos is only accepted among the `beam` best candidates of a step, so
    beam = 1 is exactly greedy decoding. A sentence is done when it has `beam` finished hypotheses or no live
    candidate; it then leaves the batch, with its cache rows and source rows. with_scores: also return the
    best hypotheses' scores (-inf where a sentence finished none).

    Every step is tensor operations on the device; its one host sync reads which sentences are still live and
    which rows took another row's beam (the cache copies only those). benchmarks/beam_reference.py is a plain
    Python-loop beam search that the tests compare with.
    """
    if beam < 1:
        raise UserInputError(f"beam={beam} must be >= 1")
    if no_repeat_ngram < 0:
        raise UserInputError(f"no_repeat_ngram={no_repeat_ngram} must be >= 0 (0: off)")
    K, device, inf = beam, max_len.device, float("inf")
    steps = int(max_len.max()) + 1  # the longest sentence's tokens + its eos
    first_max = int(max_len.min())  # no sentence is at its max_len before this step
    model = model.expand(K)
    cache = model.init_cache(batch * K, steps)
    sentence = torch.arange(batch, device=device)  # input index of each sentence still in the batch
    tokens = torch.full((batch * K, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch, K, device=device)
    scores[:, 1:] = -inf  # all beams start identical: expand only the first
    row_max_len = max_len.repeat_interleave(K)
    # Finished hypotheses: K slots per sentence and a K+1-th that takes the writes of rejected candidates.
    fin_tokens = torch.zeros(batch * (K + 1), steps, dtype=torch.long, device=device)
    fin_scores = torch.full((batch * (K + 1),), -inf, device=device)  # summed log-probabilities
    fin_len = torch.zeros(batch * (K + 1), dtype=torch.long, device=device)  # tokens, without the eos
    fin_count = torch.zeros(batch, dtype=torch.long, device=device)
    rank = torch.arange(2 * K, device=device)
    for step in range(steps):
        B = scores.shape[0]
        first_row = K * torch.arange(B, device=device)[:, None]
        lprobs = model(tokens[:, -1:], cache, step)[:, -1].float().log_softmax(-1)
        V = lprobs.shape[-1]
        if banned_ids:
            lprobs[:, list(banned_ids)] = -inf
        if step < min_len:
            lprobs[:, eos_id] = -inf
        if step >= first_max:  # force eos on the rows at their max_len
            at_max = (row_max_len <= step)[:, None] & (torch.arange(V, device=device) != eos_id)
            lprobs = lprobs.masked_fill(at_max, -inf)
        if no_repeat_ngram:
            ban_repeated_ngrams(lprobs, tokens, no_repeat_ngram)
        # The 2K best (beam, token) extensions of each sentence, best first; -inf ones are not candidates.
        top_scores, top_index = top_candidates((scores.view(-1, 1) + lprobs).view(B, K * V), 2 * K)
        top_row, top_token = first_row + top_index // V, top_index % V
        live, is_eos = top_scores > -inf, top_token == eos_id
        # An eos among the K best candidates finishes its hypothesis while the sentence has fewer than K.
        ended = (is_eos & live)[:, :K]
        place = fin_count[sentence, None] + ended.cumsum(1) - 1
        ended &= place < K
        fin_count[sentence] += ended.sum(1)
        where = (sentence[:, None] * (K + 1) + torch.where(ended, place, K)).flatten()
        fin_tokens[where, :step] = tokens[top_row[:, :K].flatten(), 1:]
        fin_scores[where] = top_scores[:, :K].flatten()
        fin_len[where] = step
        # The K best other candidates, in rank order, are the next beams; missing ones are dead (-inf) beams.
        keep = live & ~is_eos
        done = (fin_count[sentence] >= K) | ~keep.any(1)
        order = (rank + 2 * K * ~keep).topk(K, dim=1, largest=False).indices
        kept = keep.gather(1, order)
        rows = torch.where(kept, top_row.gather(1, order), first_row)
        next_tokens = torch.where(kept, top_token.gather(1, order), eos_id)
        scores = torch.where(kept, top_scores.gather(1, order), -inf)
        # The step's one host sync: the live sentences, then the rows whose beam comes from another row.
        rows = rows.flatten()
        flags = torch.cat((~done, rows != torch.arange(B * K, device=device))).nonzero().squeeze(1)
        n_live = bisect.bisect_left(flags.tolist(), B)
        if n_live == 0:
            break
        moved = flags[n_live:] - B
        if n_live < B:  # finished sentences leave the batch: their beams, cache rows and sources
            live_sentences, moved = flags[:n_live], None
            sentence, next_tokens, scores = (t[live_sentences] for t in (sentence, next_tokens, scores))
            rows = rows.view(B, K)[live_sentences].flatten()
            live_rows = (first_row[live_sentences] + torch.arange(K, device=device)).flatten()
            model, row_max_len = model.select(live_rows), row_max_len[live_rows]
        # Beams only move within their sentence, whose rows share one source: the cross-attention side needs
        # no reordering, only the self-attention slots (and the shrink above).
        for slots in cache:
            for slot in slots:
                slot.reorder(rows, step + 1, moved)
        tokens = torch.cat((tokens[rows], next_tokens.view(-1, 1)), dim=1)
    # Rank each sentence's finished hypotheses on the host, once, exactly as the reference does (ties included).
    counts, lengths = fin_count.tolist(), fin_len.view(batch, K + 1).tolist()
    sums, ids = fin_scores.view(batch, K + 1).tolist(), fin_tokens.view(batch, K + 1, steps).tolist()
    best = []
    for b in range(batch):
        hyps = [(sums[b][i] / (lengths[b][i] + 1) ** lenpen, ids[b][i][: lengths[b][i]]) for i in range(counts[b])]
        best.append(max(hyps) if hyps else (-inf, []))
    hyps = [hyp for _, hyp in best]
    return (hyps, [score for score, _ in best]) if with_scores else hyps
