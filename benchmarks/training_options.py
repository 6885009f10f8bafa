"""Activation checkpointing and torch.compile on an IIET training step: time and peak memory, in one run.

    python -m benchmarks.training_options                      # iiet r=3, the conf/lm/shakespeare.yaml shape, CPU fp32
    python -m benchmarks.training_options --device cuda --dtype bf16 --d_model 1024 --n_layers 24 --seq_len 2048

Variants (the `LanguageModel` options `activation_checkpointing` and `compile`): none, checkpointing per layer,
checkpointing per iteration (per F-evaluation), and torch.compile. Every variant trains on the same batch; rounds
alternate the variants and the table gives the median step time (forward, backward, AdamW) as a ratio to
"none". Peak memory is one forward + backward, measured as in `benchmarks/memory.py` (profiler memory events on
CPU, `max_memory_allocated` on CUDA), above the memory already live. Compilation time is reported separately and
excluded from the step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date

import torch

from benchmarks.common import (
    add_device_args,
    add_shape_args,
    device_and_autocast,
    machine,
    sync,
)
from benchmarks.memory import check_cpu_method, cpu_peak, cuda_peak
from lit_iiet.nn.decoder import Decoder, DecoderConfig, next_token_loss
from lit_iiet.nn.ode import ODEConfig

VARIANTS = ("none", "layer", "iteration", "compile")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=3, help="iiet iterations per layer")
    add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps timed per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    add_device_args(parser)
    args = parser.parse_args()
    device, autocast = device_and_autocast(parser, args)
    if device.type == "cpu" and (problem := check_cpu_method()):
        print(problem, file=sys.stderr)
        return 1

    cfg = DecoderConfig(args.vocab_size, args.n_layers, args.d_model, args.n_heads, max_seq_len=args.seq_len)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)

    models, optimizers, compile_s = {}, {}, None
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = Decoder(cfg, ODEConfig("iiet", args.iters)).to(device).train()
        if variant == "compile":
            model.compile()
        models[variant], optimizers[variant] = model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_of(variant: str) -> torch.Tensor:
        checkpointing = variant if variant in ("layer", "iteration") else "none"
        with autocast:
            logits = models[variant](batch[:, :-1], checkpointing=checkpointing)
        return next_token_loss(logits, batch)

    def step(variant: str) -> None:
        optimizers[variant].zero_grad(set_to_none=True)
        loss_of(variant).backward()
        optimizers[variant].step()

    for variant in VARIANTS:  # warm-up; for "compile" this is the compilation
        start = time.perf_counter()
        step(variant)
        sync(device)
        if variant == "compile":
            compile_s = time.perf_counter() - start
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(variant)
            sync(device)
            times[variant].append((time.perf_counter() - start) / args.steps)

    peaks = {}
    for variant in VARIANTS:
        optimizers[variant].zero_grad(set_to_none=False)  # gradients already allocated: the peak is activations

        def forward_backward(variant=variant) -> None:
            loss_of(variant).backward()

        peaks[variant] = cuda_peak(forward_backward, device) if device.type == "cuda" else cpu_peak(forward_backward)

    where = machine(device)
    print(
        f"Training options, {date.today()}, {where}, torch {torch.__version__}, {args.dtype}; iiet r={args.iters}, "
        f"{args.n_layers} x {args.d_model}, batch {args.batch_size} x {args.seq_len}; median of {args.rounds} alternating "
        f"rounds of {args.steps} steps. torch.compile took {compile_s:.1f} s (first step, excluded)."
    )
    print(f"Command: python -m benchmarks.training_options {' '.join(sys.argv[1:])}\n")
    print("| variant | step time vs none | peak memory of fwd + bwd (MiB) | vs none |")
    print("|---|---|---|---|")
    base_t, base_m = statistics.median(times["none"]), peaks["none"]
    for variant in VARIANTS:
        t = statistics.median(times[variant])
        print(f"| {variant} | {t / base_t:.2f} | {peaks[variant] / 2**20:.1f} | {peaks[variant] / base_m:.2f} |")
    if device.type == "cuda":
        print(f"\nabsolute step time of 'none': {base_t * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
