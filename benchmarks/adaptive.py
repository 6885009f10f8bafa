"""Per-token adaptive iterations against fixed IIET and vanilla, in one run on the shipped LM corpus.

    python -m benchmarks.adaptive --vanilla V.ckpt --iiet IIET.ckpt --router ROUTER.ckpt --thresholds 0.1 0.2

Rows: vanilla, IIET with its fixed schedule, the residual policy (the IIET checkpoint, no training) at each
threshold, the router checkpoint, and, with --shared_kv, IIET and the first residual threshold with one shared
KV slot per layer (the approximate cache mode, to measure its quality cost). For each row:
- evaluations per token: F-evaluations per token and layer, averaged over the whole validation split;
- agreement: share of validation positions whose argmax equals the same weights' full-iteration argmax;
- val loss on the whole validation split (the `conf/lm/shakespeare.yaml` data settings);
- cached greedy decoding tokens/s at batch 1 and batch 16 as ratios to vanilla: rounds alternate the models and
  the table gives the median; decoding gathers each iteration's active rows into a dense sub-batch, and "idle"
  is the share of (token, iteration) slots of the batch that early exit freed: 1 - sum k_t / (tokens * r).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from datetime import date

import torch

from benchmarks.common import machine
from lit_iiet.data import LMDataModule
from lit_iiet.models import LanguageModel
from lit_iiet.nn.decoder import next_token_loss
from lit_iiet.nn.generate import generate


def load(path: str, **iiet_overrides):
    """A checkpoint's Decoder, optionally under another iteration policy or cache mode (`ode.iiet.*`, same weights)."""
    options = {f"ode.iiet.{name}": value for name, value in iiet_overrides.items()}
    return LanguageModel.from_checkpoint(path, **options).model


@torch.no_grad()
def validate(model, batches) -> tuple[float, float, float | None]:
    """Val loss, F-evaluations per token per layer, and agreement with full iteration (None if not adaptive)."""
    loss_sum, n, evals_sum, agree_sum = 0.0, 0, 0.0, 0.0
    update = model.update
    for batch in batches:
        with update.trace() as trace:
            logits = model(batch[:, :-1])
        tokens = batch[:, 1:].numel()
        loss_sum += next_token_loss(logits, batch, reduction="sum").item()
        if update.implicit:
            evals_sum += torch.stack(list(trace.counts.values())).float().mean(0).sum().item()
        else:
            evals_sum += tokens * update.total_evals() / model.cfg.n_layers
        if update.adaptive:
            with update.trace(full_iterations=True):
                agree_sum += (model(batch[:, :-1]).argmax(-1) == logits.argmax(-1)).sum().item()
        n += tokens
    return loss_sum / n, evals_sum / n, agree_sum / n if update.adaptive else None


class DecodeCounter:
    """Sums each decoding step's per-token iteration counts from the model's open trace (to report evaluations
    and idle slots)."""

    def __init__(self, model, trace) -> None:
        self.model, self.trace, self.evals, self.slots = model, trace, 0.0, 0.0

    def __call__(self, module, args, output) -> None:
        update = self.model.update
        if args[0].shape[1] == 1 and update.implicit:  # one new token per row: a decoding step
            for layer, counts in self.trace.counts.items():
                self.evals += counts.sum().item()
                self.slots += counts.numel() * update.schedule[layer]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vanilla", required=True, help="euler checkpoint (the baseline of the speed ratios)")
    parser.add_argument(
        "--iiet", required=True, help="IIET checkpoint (fixed schedule; also the residual policy's weights)"
    )
    parser.add_argument("--router", help="checkpoint trained with ode.iiet.policy=router")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2], help="residual policy thresholds")
    parser.add_argument("--shared_kv", action="store_true", help="also rows with ode.iiet.kv_mode=shared")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="decoding batch sizes")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq_len", type=int, default=128, help="validation window (as in training)")
    args = parser.parse_args()

    models = {"vanilla": load(args.vanilla), "iiet (fixed)": load(args.iiet)}
    for t in args.thresholds:
        models[f"residual {t:g}"] = load(args.iiet, policy="residual", threshold=t)
    if args.router:
        models["router"] = load(args.router)
    if args.shared_kv:
        models["iiet, shared KV"] = load(args.iiet, kv_mode="shared")
        t = args.thresholds[0]
        models[f"residual {t:g}, shared KV"] = load(args.iiet, policy="residual", threshold=t, kv_mode="shared")

    data = LMDataModule(vocab_size=models["vanilla"].cfg.vocab_size, seq_len=args.seq_len, batch_size=16)
    data.setup("validate")
    batches = list(data.val_dataloader())
    quality = {label: validate(model, batches) for label, model in models.items()}

    vocab = min(m.cfg.vocab_size for m in models.values())
    speeds = {(label, b): [] for label in models for b in args.batches}
    with contextlib.ExitStack() as traces:
        counters = {label: DecodeCounter(m, traces.enter_context(m.update.trace())) for label, m in models.items()}
        for label, model in models.items():
            model.register_forward_hook(counters[label])
        for b in args.batches:
            prompt = torch.randint(4, vocab, (b, args.prompt), generator=torch.Generator().manual_seed(0))
            for model in models.values():
                generate(model, prompt, 8, temperature=0.0)  # warm-up
            for _ in range(args.rounds):
                for label, model in models.items():
                    start = time.perf_counter()
                    generate(model, prompt, args.tokens, temperature=0.0)
                    speeds[label, b].append(b * args.tokens / (time.perf_counter() - start))
    base = {b: statistics.median(speeds["vanilla", b]) for b in args.batches}

    print(
        f"Adaptive iterations, {date.today()}, {machine(torch.device('cpu'))}, torch "
        f"{torch.__version__}; validation: the whole shipped split in {args.seq_len}-token windows; decoding: "
        f"{args.prompt}-token prompt + {args.tokens} greedy tokens, median of {args.rounds} alternating rounds."
    )
    print(f"Command: python -m benchmarks.adaptive {' '.join(sys.argv[1:])}\n")
    head = " | ".join(f"decode tok/s vs vanilla, batch {b}" for b in args.batches)
    print(
        f"| model | evals / token / layer (val) | agreement with full iteration | val loss | {head} | idle slots in decoding |"
    )
    print("|---|---|---|---|" + "---|" * len(args.batches) + "---|")
    for label in models:
        loss, evals, agree = quality[label]
        ratio = " | ".join(f"{statistics.median(speeds[label, b]) / base[b]:.2f}" for b in args.batches)
        c = counters[label]
        idle = f"{1 - c.evals / c.slots:.0%}" if c.slots else "-"
        print(f"| {label} | {evals:.2f} | {'-' if agree is None else f'{agree:.1%}'} | {loss:.3f} | {ratio} | {idle} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
