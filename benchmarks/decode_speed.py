"""Cached greedy decoding speed of several checkpoints, as ratios to the first, measured in one run.

    python -m benchmarks.decode_speed vanilla=runs/shakespeare_euler/checkpoints/last.ckpt \
        iiet=runs/shakespeare/checkpoints/last.ckpt e-iiet=runs/shakespeare_iiad/checkpoints/last.ckpt

Each round decodes `--tokens` new tokens after a `--prompt`-token prompt at `--batch` sequences for every model
in turn (alternating, so that drifts of the machine's speed hit all alike); the table gives the median
tokens/s as a ratio to the first model, with each model's F-evaluations per token (layer evaluations / layers).
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch

from benchmarks.common import machine, sync
from lit_iiet.models import LanguageModel
from lit_iiet.nn.generate import generate


def decode_speeds(models: dict, batch: int, prompt_len: int, tokens: int, rounds: int, device: str) -> dict[str, float]:
    """Median cached greedy tokens/s of each model, as a ratio to the first; rounds alternate the models."""
    vocab = min(m.cfg.vocab_size for m in models.values())
    prompt = torch.randint(4, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)

    def run(model) -> float:
        sync(torch.device(device))
        start = time.perf_counter()
        generate(model, prompt, tokens, temperature=0.0)
        sync(torch.device(device))
        return batch * tokens / (time.perf_counter() - start)

    for model in models.values():
        run(model)  # warm-up
    speeds: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            speeds[label].append(run(model))
    base = statistics.median(next(iter(speeds.values())))
    return {label: statistics.median(values) / base for label, values in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="label=checkpoint.ckpt; the first is the baseline")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    models = {}
    for item in args.models:
        label, _, path = item.partition("=")
        models[label] = LanguageModel.from_checkpoint(path, map_location=args.device).model
    ratios = decode_speeds(models, args.batch, args.prompt, args.tokens, args.rounds, args.device)
    print(
        f"Cached greedy decoding, {date.today()}, {machine(torch.device(args.device))}, torch {torch.__version__}; batch {args.batch}, "
        f"{args.prompt}-token prompt + {args.tokens} new tokens; median of {args.rounds} alternating rounds.\n"
    )
    print("| model | schedule | F-evals / token / layer | decode tokens/s vs first |")
    print("|---|---|---|---|")
    for label, model in models.items():
        evals = model.update.total_evals() / model.cfg.n_layers
        print(f"| {label} | {model.update.schedule} | {evals:.2f} | {ratios[label]:.2f} |")


if __name__ == "__main__":
    main()
