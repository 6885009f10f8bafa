"""Beam search: the tensorized `lit_iiet.nn.generate.beam_search` against the old one it replaced
(`benchmarks/beam_reference.py`), in one run.

    OMP_NUM_THREADS=1 python -m benchmarks.beam_search --bible_sentences 128 --rounds 1   # 9 minutes, 2-core CPU
    python -m benchmarks.beam_search                     # the whole Bible test split, 3 rounds: over an hour there
    python -m benchmarks.beam_search --part synthetic --beams 4 8 12 --device cuda

The model has random (seeded) weights and the shape of conf/mt/bible_fr_en.yaml: 3 + 3 layers x 256, d_ff 512,
4 heads, a 4,000-token joint vocabulary, euler decoder (`--dec_scheme` for another one). Speed does not depend
on what the weights say, but how long hypotheses run does: random weights almost never rank eos first, so the
eos row of the tied embedding is scaled by `--eos_scale`, and hypotheses end at varied lengths, as a trained
model's do (sentences finish apart, which the new search exploits: finished sentences leave the batch).

Parts:
- "bible": the first `--bible_sentences` sources of the shipped Bible test split, encoded as the data module
  does (a joint SentencePiece vocabulary trained on the train split, cached like `lit_iiet fit`; + eos), sorted
  by length into batches of `--batch_size`; max_len = 1.2 x source + 10 and lenpen 1, as in the configs.
- "synthetic": `--sentences` random sources of `--src_len` tokens in one call; min_len = max_len = `--tgt_len`,
  so every hypothesis runs tgt_len steps + the forced eos (checked). Timers around the model's forward
  (`Seq2Seq.decode`) and the cache reorder give the profile of a step: the share of its time that is the
  search's own work (everything but the forward). On CUDA their syncs slow both searches alike.
- "reorder": how to keep the self-attention cache in beam order, per step at the synthetic shape with the cache
  half full (`--tgt_len` / 2 positions, every decoder slot): the old in-place gather, the gather into a second
  buffer (`KVCache.reorder`), and indexing on read (write-once rows, gathered through an ancestry table when
  the attention reads them), each followed by the attention's read of the prefix.

Rounds alternate the new and the reference search at every beam; tables give medians. Every timed call of both
searches must return the same hypotheses, and scores within 1e-6 (exit status 1 otherwise). Speed is given as
ratios; absolute sentences/s only on CUDA (docs/DESIGN.md, section 6).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

from benchmarks.beam_reference import reference_beam_search
from benchmarks.common import SCHEMES, add_device_args, device_and_autocast, machine, sync
from lit_iiet.nn.generate import beam_search
from lit_iiet.nn.layers import KVCache
from lit_iiet.nn.seq2seq import Seq2Seq, Seq2SeqConfig

SEARCHES = {"new": beam_search, "reference": reference_beam_search}


def bible_batches(max_src_len: int, vocab_size: int, sentences: int | None, batch_size: int):
    """Length-sorted (src, src_mask) batches of the Bible test sources, the tokenizer's ids, and the sentence count."""
    from lit_iiet.data import TranslationDataModule

    dm = TranslationDataModule(vocab_size=vocab_size, max_src_len=max_src_len, max_tgt_len=max_src_len)
    dm.prepare_data()
    dm.setup()
    tok = dm.tokenizer
    texts = [s for s, _ in dm.texts["test"]][:sentences]
    ids = sorted((s[: max_src_len - 1] + [tok.eos_id] for s in tok.encode_batch(texts)), key=len)
    batches = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        src = torch.full((len(rows), max(map(len, rows))), tok.pad_id)
        for b, row in enumerate(rows):
            src[b, : len(row)] = torch.tensor(row)
        batches.append((src, src != tok.pad_id))
    return batches, tok, len(ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "bible", "synthetic", "reorder"], default="all")
    parser.add_argument("--beams", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3, help="encoder and decoder layers")
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--dec_scheme", default="euler", choices=list(SCHEMES))
    parser.add_argument("--eos_scale", type=float, default=6.0, help="multiplier of the eos embedding row")
    parser.add_argument("--bible_sentences", type=int, default=None, help="part bible: first N test sources (all)")
    parser.add_argument("--batch_size", type=int, default=32, help="part bible: sources per beam_search call")
    parser.add_argument("--sentences", type=int, default=256, help="part synthetic / reorder")
    parser.add_argument("--src_len", type=int, default=32, help="part synthetic / reorder")
    parser.add_argument("--tgt_len", type=int, default=64, help="part synthetic / reorder")
    parser.add_argument("--rounds", type=int, default=3)
    add_device_args(parser)
    args = parser.parse_args()
    device, autocast = device_and_autocast(parser, args)
    cuda = device.type == "cuda"
    torch.set_grad_enabled(False)
    print(f"# {date.today()} | {machine(device)} | torch {torch.__version__} | {args.dtype}")
    print("# python -m benchmarks.beam_search " + shlex.join(sys.argv[1:]))
    failed = False

    def make_model(max_len: int) -> Seq2Seq:
        cfg = Seq2SeqConfig(
            args.vocab_size,
            args.d_model,
            4,
            args.layers,
            args.layers,
            d_ff=2 * args.d_model,
            dropout=0.0,
            max_src_len=max_len,
            max_tgt_len=max_len,
        )
        torch.manual_seed(0)
        model = Seq2Seq(cfg, SCHEMES["euler"], SCHEMES[args.dec_scheme]).to(device).eval()
        model.embed.weight[3] *= args.eos_scale  # eos (id 3 in the tokenizer and below); the output head is tied
        return model

    def timed(fn) -> tuple[float, object]:
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - start, out

    def compare(name: str, beam: int, new, ref) -> None:
        nonlocal failed
        same_hyps = new[0] == ref[0]
        same_scores = all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) or a == b for a, b in zip(new[1], ref[1]))
        if not (same_hyps and same_scores):
            print(
                f"\nFAIL: {name}, beam {beam}: the new search differs from the reference "
                f"({sum(a != b for a, b in zip(new[0], ref[0]))} hypotheses differ)"
            )
            failed = True

    def race(name: str, calls: dict, sentences: int) -> None:
        """Alternate new and reference at every beam; print sentences/s new vs reference."""
        times: dict = {}
        for round_ in range(args.rounds):
            for beam in args.beams:
                outs = {}
                for search in SEARCHES:
                    t, outs[search] = timed(lambda: calls[search](beam))
                    times.setdefault((search, beam), []).append(t)
                compare(name, beam, outs["new"], outs["reference"])
        absolute = " new sentences/s | reference sentences/s |" if cuda else ""
        print(f"\n| {name} | beam | sentences/s, new / reference |{absolute}")
        print("|---|---|---|" + ("---|---|" if cuda else ""))
        for beam in args.beams:
            new, ref = (statistics.median(times[s, beam]) for s in SEARCHES)
            cells = f" {sentences / new:.1f} | {sentences / ref:.1f} |" if cuda else ""
            print(f"| | {beam} | {ref / new:.2f} |{cells}")

    # --- part bible ------------------------------------------------------------------------------------------
    if args.part in ("all", "bible"):
        batches, tok, n = bible_batches(128, args.vocab_size, args.bible_sentences, args.batch_size)
        assert (tok.bos_id, tok.eos_id) == (2, 3)
        model = make_model(128)
        lengths = []

        def translate_all(search: str, beam: int):
            outs = ([], [])
            with autocast:
                for src, mask in batches:
                    src, mask = src.to(device), mask.to(device)
                    max_len = (1.2 * mask.sum(1) + 10).long().clamp(max=127)
                    hyps, scores = SEARCHES[search](
                        model.decoder_for(src, mask),
                        src.shape[0],
                        tok.bos_id,
                        tok.eos_id,
                        max_len,
                        beam,
                        banned_ids=(tok.pad_id, tok.bos_id),
                        with_scores=True,
                    )
                    outs[0].extend(hyps)
                    outs[1].extend(scores)
            return outs

        lengths = [len(h) for h in translate_all("new", args.beams[0])[0]]
        print(
            f"\nBible test split: {n} sources in {len(batches)} length-sorted batches of {args.batch_size}; "
            f"hypotheses of {min(lengths)} to {max(lengths)} tokens (median {statistics.median(lengths):g}) "
            f"at beam {args.beams[0]}."
        )
        race("Bible test", {s: (lambda beam, s=s: translate_all(s, beam)) for s in SEARCHES}, n)

    # --- synthetic batch ----------------------------------------------------------------------------------------
    S, T, N = args.src_len, args.tgt_len, args.sentences
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(4, args.vocab_size, (N, S), generator=gen).to(device)
    mask = torch.ones_like(src, dtype=torch.bool)
    max_len = torch.full((N,), T, device=device)
    model = make_model(max(S, T + 1))

    moved_share: dict[int, float] = {}  # beam -> share of the rows that take another row's cache at a step
    shares: dict = {}  # (search, beam) -> [(forward, reorder) shares of the steps' time, one per call]

    def synthetic(search: str, beam: int):
        """One call on the synthetic batch, with timers around the model's forward and the cache reorders."""
        nonlocal failed
        spent, moved = {"forward": 0.0, "reorder": 0.0}, [0, 0]
        decode, reorder = model.decode, KVCache.reorder

        def timer(key, fn):
            def wrapped(*a, **kw):
                sync(device)
                start = time.perf_counter()
                spent.setdefault("first step", start)
                out = fn(*a, **kw)
                sync(device)
                spent[key] += time.perf_counter() - start
                return out

            return wrapped

        def counted_reorder(cache, index, length, rows=None):
            if rows is not None:
                moved[0], moved[1] = moved[0] + rows.numel(), moved[1] + index.numel()
            return timed_reorder(cache, index, length, rows)

        timed_reorder = timer("reorder", reorder)
        model.decode, KVCache.reorder = timer("forward", decode), counted_reorder
        try:
            with autocast:
                out = SEARCHES[search](
                    model.decoder_for(src, mask), N, 2, 3, max_len, beam, min_len=T, banned_ids=(0, 2), with_scores=True
                )
            sync(device)
            steps = time.perf_counter() - spent["first step"]  # the steps: not the setup (encoding, cache allocation)
        finally:
            del model.decode
            KVCache.reorder = reorder
        if search == "new":
            moved_share[beam] = moved[0] / max(moved[1], 1)
            if {len(h) for h in out[0]} != {T}:
                print(f"\nFAIL: beam {beam}: hypotheses of lengths {sorted({len(h) for h in out[0]})}, expected {T}")
                failed = True
        shares.setdefault((search, beam), []).append((spent["forward"] / steps, spent["reorder"] / steps))
        return out

    if args.part in ("all", "synthetic"):
        print(f"\nSynthetic batch: {N} random sources of {S} tokens, exactly {T} tokens + eos per hypothesis.")
        race("synthetic", {s: (lambda beam, s=s: synthetic(s, beam)) for s in SEARCHES}, N)
        print(
            "\nProfile of a step, in the same calls: shares of the time from the first step on (not the setup before "
            "it: encoding, cache allocation), median over the calls. The reference reorders its cache inline: "
            "counted in the rest of its search.\n"
        )
        print("| search | beam | model forward | cache reorder | rest of the search | search's own work |")
        print("|---|---|---|---|---|---|")
        for search in SEARCHES:
            for beam in args.beams:
                fwd, reo = (statistics.median(x[i] for x in shares[search, beam]) for i in (0, 1))
                print(f"| {search} | {beam} | {fwd:.1%} | {reo:.1%} | {1 - fwd - reo:.1%} | {1 - fwd:.1%} |")

    # --- cache reorder strategies ------------------------------------------------------------------------------
    if args.part in ("all", "reorder"):
        H, D, L, length, reps = 4, args.d_model // 4, T + 1, T // 2, 20
        slots = model.dec_update.total_evals()  # one cache slot per (decoder layer, F-evaluation)
        for beam in args.beams:
            if beam not in moved_share:
                synthetic("new", beam)
        print(
            f"\nCache reorder, per step: {slots} decoder slots of (rows, {H} heads, {length} filled positions, {D}); a "
            f"reorder + the attention's read of the prefix, median of {reps}; time vs the old in-place gather. Rows "
            "moved: the share of rows that take another row's beam (measured in the synthetic search, and all).\n"
        )
        print(
            "| beam | rows moved | in place, every row (old) | second buffer, every row | index on read | moved rows only "
            "| KVCache.reorder (new) |"
        )
        print("|---|---|---|---|---|---|---|")
        for beam in args.beams:
            R = N * beam
            for share in (moved_share[beam], 1.0):
                g = torch.Generator().manual_seed(beam)
                own = torch.arange(R)
                other = own - own % beam + (own % beam + torch.randint(1, max(beam, 2), (R,), generator=g)) % beam
                parents = torch.where(torch.rand(R, generator=g) < share, other, own).to(device)
                moved = (parents != own.to(device)).nonzero().squeeze(1)
                q = torch.randn(R, H, 1, D, device=device)

                def read(cache):
                    k, v = cache.prefix(length)
                    return k, v, F.scaled_dot_product_attention(q, k, v)

                def in_place(cache):
                    cache.k[:, :, :length] = cache.k[:, :, :length].index_select(0, parents)
                    cache.v[:, :, :length] = cache.v[:, :, :length].index_select(0, parents)
                    return read(cache)

                def second_buffer(cache):
                    # Gather into a spare buffer that then becomes the cache: one read and one write of every prefix.
                    torch.index_select(cache.k[:, :, :length], 0, parents, out=cache.spare_k[:, :, :length])
                    torch.index_select(cache.v[:, :, :length], 0, parents, out=cache.spare_v[:, :, :length])
                    cache.k, cache.spare_k, cache.v, cache.spare_v = cache.spare_k, cache.k, cache.spare_v, cache.v
                    return read(cache)

                def index_on_read(cache):
                    # Row r's position t lives in row ancestry[r, t]: the table is reordered, the cache never is.
                    cache.ancestry = cache.ancestry[parents]
                    pos = torch.arange(length, device=device)
                    k = cache.k[cache.ancestry, :, pos].transpose(1, 2)
                    v = cache.v[cache.ancestry, :, pos].transpose(1, 2)
                    return k, v, F.scaled_dot_product_attention(q, k, v)

                def moved_rows(cache):
                    # KVCache.reorder itself switches to the second buffer when over a fifth of the rows move.
                    for buf in (cache.k, cache.v):
                        buf[:, :, :length].index_copy_(0, moved, buf[:, :, :length].index_select(0, parents[moved]))
                    return read(cache)

                def kv_cache_reorder(cache):
                    cache.reorder(parents, length, moved)
                    return read(cache)

                strategies = (in_place, second_buffer, index_on_read, moved_rows, kv_cache_reorder)
                results, times = [], {}
                for fn in strategies:
                    torch.manual_seed(1)
                    caches = [KVCache(R, H, L, D, device) for _ in range(slots)]
                    for c in caches:
                        c.k.normal_(), c.v.normal_()
                        c.spare_k, c.spare_v = torch.empty_like(c.k), torch.empty_like(c.v)
                        c.ancestry = torch.arange(R, device=device)[:, None].expand(R, length)
                    results.append([[t.clone() for t in fn(c)[:2]] for c in caches])  # the keys and values read
                    times[fn] = statistics.median(timed(lambda: [fn(c) for c in caches])[0] for _ in range(reps))
                if not all(
                    torch.equal(x, y) for other in results[1:] for a, b in zip(results[0], other) for x, y in zip(a, b)
                ):
                    print(f"\nFAIL: beam {beam}: the reorder strategies read different caches")
                    failed = True
                cells = " | ".join(f"{times[fn] / times[in_place]:.2f}" for fn in strategies)
                print(f"| {beam} | {share:.1%} | {cells} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
