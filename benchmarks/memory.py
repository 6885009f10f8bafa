"""Peak memory of each layer-update scheme: a training step, cached decoding, and the KV cache itself.

    python -m benchmarks.memory                               # small fp32 CPU shapes, about a minute on 2 cores
    python -m benchmarks.memory --device cuda --dtype bf16 --d_model 1024 --n_layers 24 --seq_len 2048 --batch_size 8

For every scheme (same shape, seeded random weights), three numbers, each with its ratio to euler:

* training step: the peak of tensor memory during forward, `F.cross_entropy` on fp32 logits and backward (no
  optimizer step; gradients start unset, so they are part of the peak), above what was live before the step
  (the model's parameters and buffers, whose size is printed once in the header);
* cached decoding: the peak during `generate(model, prompt, new_tokens, temperature=0.0, use_cache=True)`
  above what was live before it; the KV cache is allocated inside, so it is part of this peak;
* KV cache: the bytes of the cache's buffers for that decoding (`Decoder.init_cache(batch, prompt + new_tokens)`,
  the sum of every `KVCache`'s k and v), which has one slot per (layer, F-evaluation) and so grows with the
  scheme's evaluations.

How the peak is measured (printed in the header):
* CUDA: `torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()` after `reset_peak_memory_stats()`,
  i.e. the caching allocator's own peak of allocated blocks, not of reserved memory.
* CPU: `torch.profiler.profile(profile_memory=True)` records one event per allocation (+bytes) and free (-bytes)
  of the CPU allocator; the peak is the maximum of their running sum ordered by time. Frees of tensors
  allocated before the profiler started are not recorded (the profiler does not know their size), so a measured
  region must not free anything older than itself (both measured regions here only free what they allocated).
  Before measuring, the script checks the method on allocations of known sizes and exits with status 1 if the
  measured peak is not exactly the expected one.
Each measurement is preceded by one unmeasured call (warm-up: lazy initialisation, cuBLAS workspaces).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import sys
from datetime import date

import torch

from benchmarks.common import (
    SCHEMES,
    add_device_args,
    add_shape_args,
    device_and_autocast,
    machine,
)
from lit_iiet.nn.decoder import Decoder, DecoderConfig, next_token_loss
from lit_iiet.nn.generate import generate

DEFAULT_SCHEMES = ["euler", "iiet r=2", "iiet r=3", "iiet r=4", "rk2", "rk4", "pcformer"]
MiB = 2**20


@contextlib.contextmanager
def _kineto_quiet():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs two lines per start/stop there.

    A Python exception raised inside still shows: it is printed after the descriptor is restored.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak(fn) -> int:
    """Peak bytes of CPU tensor memory during fn() above what was live when it started (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def cuda_peak(fn, device: torch.device) -> int:
    """Peak bytes allocated by the CUDA caching allocator during fn() above what was allocated when it started."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def check_cpu_method() -> str | None:
    """None if `cpu_peak` measures known allocations exactly, else what went wrong."""
    kept: list[torch.Tensor] = []

    def known() -> None:  # 1 + 2 + 4 = 7 MiB, then 1 + 2 + 6 = 9 MiB (the peak); `a` outlives the call
        a = torch.empty(MiB // 4)  # 1 MiB of fp32
        b = torch.empty(MiB // 2)  # 2 MiB
        c = torch.empty(MiB)  # 4 MiB
        del c
        d = torch.empty(3 * MiB // 2)  # 6 MiB
        kept.append(a)
        del b, d

    expected = (1 + 2 + 6) * MiB
    measured = cpu_peak(known)
    return (
        None
        if measured == expected
        else f"known allocations peak at {expected} bytes, the profiler method measured {measured}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser, d_model=256, seq_len=256, batch_size=8)
    parser.add_argument("--decode_batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES, choices=list(SCHEMES))
    add_device_args(parser)
    args = parser.parse_args()

    device, autocast = device_and_autocast(parser, args)
    cuda = device.type == "cuda"
    if cuda:
        method = "torch.cuda.max_memory_allocated - memory_allocated at the start, after reset_peak_memory_stats"

        def peak_of(fn) -> int:
            return cuda_peak(fn, device)
    else:
        problem = check_cpu_method()
        if problem:
            print(f"FAIL: the CPU peak-memory method is wrong: {problem}")
            return 1
        method = (
            "torch.profiler memory events (profile_memory=True), maximum of the running sum of allocations and "
            "frees; checked exact on known allocations in this run"
        )
        peak_of = cpu_peak

    cfg = DecoderConfig(
        args.vocab_size,
        args.n_layers,
        args.d_model,
        args.n_heads,
        max_seq_len=max(args.seq_len, args.prompt + args.new_tokens),
    )
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    prompt = torch.randint(0, cfg.vocab_size, (args.decode_batch, args.prompt), generator=gen).to(device)

    rows = {}
    for name in args.schemes:
        torch.manual_seed(0)
        model = Decoder(cfg, SCHEMES[name]).to(device)
        state_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))

        def train_step(model=model) -> None:
            model.train()
            model.zero_grad(set_to_none=True)
            with autocast:
                logits = model(batch[:, :-1])
            next_token_loss(logits, batch).backward()

        def decode(model=model) -> None:
            model.eval()
            with autocast:
                generate(model, prompt, args.new_tokens, temperature=0.0, use_cache=True)

        train_step()
        model.zero_grad(set_to_none=True)
        train = peak_of(train_step)
        model.zero_grad(set_to_none=True)
        decode()
        dec = peak_of(decode)
        cache = model.init_cache(args.decode_batch, args.prompt + args.new_tokens)
        cache_bytes = sum(buf.nbytes for slots in cache for slot in slots for buf in slot.buffers())
        del cache
        rows[name] = (model.update.total_evals() / cfg.n_layers, train, dec, cache_bytes, state_bytes)
        del model

    where = machine(device)
    base = rows.get("euler")
    print(
        f"Peak memory per scheme, {date.today()}, {where}, torch {torch.__version__}, {args.dtype}; {args.n_layers} layers x "
        f"{args.d_model}, {args.n_heads} heads, vocab {args.vocab_size}; training step on batch {args.batch_size} x "
        f"{args.seq_len}; cached decoding of batch {args.decode_batch}, {args.prompt}-token prompt + {args.new_tokens} "
        f"new tokens; euler's parameters + buffers ({base[4] / MiB if base else next(iter(rows.values()))[4] / MiB:.1f} MiB) "
        f"are live before each measurement and not counted. Peak measured by {method}. Command: "
        f"`python -m benchmarks.memory {shlex.join(sys.argv[1:])}`\n"
    )
    print(
        "| scheme | F-evals / layer | train step peak (MiB) | vs euler | decode peak (MiB) | vs euler | KV cache (MiB) | vs euler | KV cache / decode peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (evals, train, dec, cache_bytes, _) in rows.items():
        ratio = (lambda i, v: f"{v / base[i]:.2f}") if base else (lambda i, v: "n/a")
        print(
            f"| {name} | {evals:g} | {train / MiB:.1f} | {ratio(1, train)} | {dec / MiB:.1f} | {ratio(2, dec)} | "
            f"{cache_bytes / MiB:.2f} | {ratio(3, cache_bytes)} | {cache_bytes / dec:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
