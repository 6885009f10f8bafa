"""Generation speed: the KV cache against full recomputation, and beam search of the encoder-decoder, in one run.

    python -m benchmarks.generation                           # small fp32 CPU shapes, a few minutes on 2 cores
    python -m benchmarks.generation --device cuda --dtype bf16 --d_model 1024 --n_layers 12 --schemes euler "iiet r=3" rk4
    python -m benchmarks.generation --part beam --beams 1 4 8 12

All models have random weights (seeded): speed does not depend on what the weights say, only on the shapes and
on how many tokens are decoded, which both parts fix.

Part "cache": greedy decoding of `--new_tokens` tokens after a `--prompt`-token prompt with
`generate(..., temperature=0.0, use_cache=True)` and with `use_cache=False` (every step reruns the whole
sequence), for each decoder-only scheme and batch size. Each round runs cached then uncached for every
(scheme, batch); the table gives the median tokens/s of cached / uncached, and cached tokens/s as a ratio to
euler's at the same batch. The greedy tokens of the two paths must be identical in fp32 (exit status 1
otherwise); under bf16 their agreement is only reported.

Part "beam": `beam_search` of the encoder-decoder `Seq2Seq` (euler decoder; encoder scheme as given) on
`--sentences` random sources of `--src_len` tokens, with beams `--beams`. max_len = min_len = `--tgt_len`, so
every sentence decodes exactly tgt_len tokens + the forced eos (tgt_len + 1 decoder steps, checked). A timed
call includes encoding the sources, as in `Seq2SeqModel.translate`. Rounds alternate every (scheme, beam); the
table gives output tokens/s (= sentences * tgt_len / s) as a ratio to beam 1 of the same scheme, the same for
hypothesis tokens/s (output tokens/s * beam: the work that beam search batches), and sentences/s as a ratio
to euler at beam 1. Absolute tokens/s and sentences/s are printed only on CUDA (docs/DESIGN.md, section 6).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from datetime import date

import torch

from benchmarks.common import (
    SCHEMES,
    add_device_args,
    device_and_autocast,
    machine,
    sync,
)
from lit_iiet.nn.decoder import Decoder, DecoderConfig
from lit_iiet.nn.generate import beam_search, generate
from lit_iiet.nn.ode import ODEConfig
from lit_iiet.nn.seq2seq import Seq2Seq, Seq2SeqConfig

PAD, BOS, EOS = 0, 1, 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "cache", "beam"], default="all")
    parser.add_argument("--n_layers", type=int, default=4, help="decoder-only layers (part cache)")
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--schemes", nargs="+", default=["euler", "iiet r=3"], choices=list(SCHEMES), help="part cache")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="part cache")
    parser.add_argument("--prompt", type=int, default=16, help="part cache")
    parser.add_argument("--new_tokens", type=int, default=256, help="part cache")
    parser.add_argument("--enc_layers", type=int, default=3, help="part beam")
    parser.add_argument("--dec_layers", type=int, default=3, help="part beam")
    parser.add_argument(
        "--enc_schemes", nargs="+", default=["euler", "iiet r=3"], choices=list(SCHEMES), help="part beam"
    )
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4, 8], help="part beam")
    parser.add_argument("--sentences", type=int, default=16, help="part beam: sources per beam_search call")
    parser.add_argument("--src_len", type=int, default=32, help="part beam")
    parser.add_argument("--tgt_len", type=int, default=32, help="part beam: tokens decoded per sentence")
    parser.add_argument("--rounds", type=int, default=3)
    add_device_args(parser)
    args = parser.parse_args()

    device, autocast = device_and_autocast(parser, args)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)

    def timed(fn):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - start, out

    where = machine(device)
    print(
        f"Generation speed, {date.today()}, {where}, torch {torch.__version__}, {args.dtype}; random weights; median of "
        f"{args.rounds} alternating rounds. Command: `python -m benchmarks.generation {shlex.join(sys.argv[1:])}`"
    )
    failed = False

    # --- part cache: cached vs uncached greedy decoding ------------------------------------------------------
    if args.part in ("all", "cache"):
        cfg = DecoderConfig(
            args.vocab_size, args.n_layers, args.d_model, args.n_heads, max_seq_len=args.prompt + args.new_tokens
        )
        models = {}
        for name in args.schemes:
            torch.manual_seed(0)
            models[name] = Decoder(cfg, SCHEMES[name]).to(device).eval()
        prompts = {
            b: torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=gen).to(device) for b in args.batches
        }

        def decode(name: str, b: int, use_cache: bool):
            def run():
                with autocast:
                    return generate(models[name], prompts[b], args.new_tokens, temperature=0.0, use_cache=use_cache)

            return run

        agree = {}
        for name in models:  # warm-up and the token check
            for b in prompts:
                cached, uncached = decode(name, b, True)()[:, args.prompt :], decode(name, b, False)()[:, args.prompt :]
                agree[name, b] = (cached == uncached).float().mean().item()
                if args.dtype == "fp32" and agree[name, b] < 1.0:
                    print(
                        f"\nFAIL: {name}, batch {b}: cached and uncached greedy tokens agree on only {100 * agree[name, b]:.1f}%"
                    )
                    failed = True
        times: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for name in models:
                for b in prompts:
                    for use_cache in (True, False):
                        times.setdefault((name, b, use_cache), []).append(timed(decode(name, b, use_cache))[0])
        med = {k: statistics.median(v) for k, v in times.items()}

        print(
            f"\nCached vs uncached greedy decoding: {args.n_layers} layers x {args.d_model}, {args.n_heads} heads, vocab "
            f"{args.vocab_size}; {args.prompt}-token prompt + {args.new_tokens} new tokens.\n"
        )
        absolute = " cached tokens/s | uncached tokens/s |" if cuda else ""
        print(
            "| scheme | F-evals / layer | batch | cached / uncached tokens/s | cached tokens/s vs euler | tokens identical |"
            + absolute
        )
        print("|---|---|---|---|---|---|" + ("---|---|" if cuda else ""))
        for name, model in models.items():
            evals = model.update.total_evals() / cfg.n_layers
            for b in prompts:
                speedup = med[name, b, False] / med[name, b, True]
                vs_euler = f"{med['euler', b, True] / med[name, b, True]:.2f}" if "euler" in models else "n/a"
                ident = "yes" if agree[name, b] == 1.0 else f"no ({100 * agree[name, b]:.1f}%)"
                n = b * args.new_tokens
                cells = f" {n / med[name, b, True]:.0f} | {n / med[name, b, False]:.0f} |" if cuda else ""
                print(f"| {name} | {evals:g} | {b} | {speedup:.2f} | {vs_euler} | {ident} |{cells}")

    # --- part beam: beam search of the encoder-decoder -------------------------------------------------------
    if args.part in ("all", "beam"):
        s2s_cfg = Seq2SeqConfig(
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            n_heads=args.n_heads,
            enc_layers=args.enc_layers,
            dec_layers=args.dec_layers,
            d_ff=4 * args.d_model,
            dropout=0.0,
            max_src_len=args.src_len,
            max_tgt_len=args.tgt_len + 1,
        )
        s2s = {}
        for name in args.enc_schemes:
            torch.manual_seed(0)
            s2s[name] = Seq2Seq(s2s_cfg, SCHEMES[name], ODEConfig("euler")).to(device).eval()
        src = torch.randint(EOS + 1, args.vocab_size, (args.sentences, args.src_len), generator=gen).to(device)
        src_mask = torch.ones_like(src, dtype=torch.bool)
        max_len = torch.full((args.sentences,), args.tgt_len, device=device)

        def translate(name: str, beam: int):
            def run():
                with autocast, torch.no_grad():
                    decoder = s2s[name].decoder_for(src, src_mask)
                    return beam_search(
                        decoder, args.sentences, BOS, EOS, max_len, beam, min_len=args.tgt_len, banned_ids=(PAD, BOS)
                    )

            return run

        for name in s2s:  # warm-up and the length check
            for beam in args.beams:
                lengths = {len(hyp) for hyp in translate(name, beam)()}
                if lengths != {args.tgt_len}:
                    print(
                        f"\nFAIL: {name}, beam {beam}: hypotheses of lengths {sorted(lengths)}, expected {args.tgt_len}"
                    )
                    failed = True
        times = {}
        for _ in range(args.rounds):
            for name in s2s:
                for beam in args.beams:
                    times.setdefault((name, beam), []).append(timed(translate(name, beam))[0])
        med = {k: statistics.median(v) for k, v in times.items()}

        print(
            f"\nBeam search of the encoder-decoder: {args.enc_layers} encoder layers (scheme below) + {args.dec_layers} "
            f"euler decoder layers x {args.d_model}, d_ff {4 * args.d_model}, vocab {args.vocab_size}; {args.sentences} "
            f"sources of {args.src_len} tokens, exactly {args.tgt_len} tokens + eos decoded per sentence.\n"
        )
        absolute = " output tokens/s | sentences/s |" if cuda else ""
        print(
            "| encoder scheme | beam | output tokens/s vs beam 1 | hypothesis tokens/s vs beam 1 | sentences/s vs euler beam 1 |"
            + absolute
        )
        print("|---|---|---|---|---|" + ("---|---|" if cuda else ""))
        for name in s2s:
            for beam in args.beams:
                t = med[name, beam]
                vs_beam1 = med[name, 1] / t if 1 in args.beams else None
                vs_euler = f"{med['euler', 1] / t:.2f}" if "euler" in s2s and 1 in args.beams else "n/a"
                cells = f" {args.sentences * args.tgt_len / t:.0f} | {args.sentences / t:.1f} |" if cuda else ""
                print(
                    f"| {name} | {beam} | {f'{vs_beam1:.2f}' if vs_beam1 else 'n/a'} | "
                    f"{f'{vs_beam1 * beam:.2f}' if vs_beam1 else 'n/a'} | {vs_euler} |{cells}"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
