"""Training step time of each layer-update scheme as a ratio to euler, measured in one run.

    python -m benchmarks.scheme_step_time                     # the conf/lm/shakespeare.yaml shape, fp32 on CPU
    python -m benchmarks.scheme_step_time --device cuda --dtype bf16 --d_model 1024 --n_layers 24 --seq_len 2048

Every scheme trains on the same batch. Rounds alternate the schemes (euler, iiet r=2, ..., euler, iiet r=2, ...)
so that drifts of the machine's speed hit all of them alike; each round times a few full optimizer steps
(forward, backward, AdamW) and the table reports the median over rounds. "per evaluation" divides the ratio by
the scheme's F-evaluations per layer; it is below 1 because the embedding, head and optimizer cost the same for
every scheme. The last column is the fair test of "a scheme costs its evaluations and nothing more": the step
time against a vanilla model with as many layers as the scheme has evaluations (ideal 1.00).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from datetime import date

import torch

from benchmarks.common import (
    SCHEMES,
    add_device_args,
    add_shape_args,
    device_and_autocast,
    machine,
    sync,
    train_step,
)
from lit_iiet.nn.decoder import Decoder, DecoderConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps timed per scheme and round")
    parser.add_argument("--rounds", type=int, default=7)
    add_device_args(parser)
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    args = parser.parse_args()

    device, autocast = device_and_autocast(parser, args)
    cfg = DecoderConfig(args.vocab_size, args.n_layers, args.d_model, args.n_heads, max_seq_len=args.seq_len)
    batch = torch.randint(
        0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0)
    ).to(device)

    runs = {}
    for name in args.schemes:
        torch.manual_seed(0)
        model = Decoder(cfg, SCHEMES[name]).to(device)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    # The fair reference for a scheme with e evaluations per layer: a vanilla model with e times the layers
    # (the same F-evaluations, the same embedding, head and optimizer).
    deep = {}
    for model, _ in list(runs.values()):
        evals = model.update.total_evals()
        if evals != args.n_layers and f"euler x{evals}" not in runs:
            torch.manual_seed(0)
            name = f"euler x{evals}"
            deep_model = Decoder(replace(cfg, n_layers=evals), SCHEMES["euler"]).to(device)
            runs[name] = (deep_model, torch.optim.AdamW(deep_model.parameters(), lr=1e-4))
            deep[evals] = name

    def step(model, optimizer) -> None:
        train_step(model, optimizer, batch, autocast)

    for model, optimizer in runs.values():  # warm up allocator, kernels and autotuning
        step(model, optimizer)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer)
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)

    base = statistics.median(times["euler"]) if "euler" in times else None
    where = machine(device)
    print(
        f"Training step time per scheme, {date.today()}, {where}, torch {torch.__version__}, {args.dtype}; "
        f"{args.n_layers} layers x {args.d_model}, batch {args.batch_size} x {args.seq_len} tokens; "
        f"median of {args.rounds} alternating rounds of {args.steps} steps.\n"
    )
    print(
        "| scheme | F-evals / layer | step time vs euler | per evaluation | vs euler with the same evaluations |"
        + (" step time (ms) |" if device.type == "cuda" else "")
    )
    print("|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for name, (model, _) in runs.items():
        if name in deep.values():
            continue
        median = statistics.median(times[name])
        evals = model.update.total_evals() / args.n_layers
        ratio = f"{median / base:.2f}" if base else "n/a"
        per_eval = f"{median / base / evals:.2f}" if base else "n/a"
        reference = deep.get(model.update.total_evals())
        same = f"{median / statistics.median(times[reference]):.2f} ({reference} layers)" if reference else "1.00"
        absolute = f" {1000 * median:.1f} |" if device.type == "cuda" else ""  # absolute times only from a GPU
        print(f"| {name} | {evals:g} | {ratio} | {per_eval} | {same} |{absolute}")


if __name__ == "__main__":
    main()
