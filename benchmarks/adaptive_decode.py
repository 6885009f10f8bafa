"""Do saved iterations save decoding time? Adaptive policies against fixed IIET r = 3, random weights, one run.

    python -m benchmarks.adaptive_decode --widths 128 512 1024 --batch 16

For each width (4 layers, heads of 32, SwiGLU, vocab 2048, random weights): fixed IIET r = 3, the residual
policy (threshold = the median relative increment of iteration 2 on the prompt, so that about half the tokens
stop after the vanilla step) and the router policy (random routers: about half continue at each iteration), each
router/residual row under both `ode.iiet.early_exit_compaction` paths:
- all: the active rows and their gathered KV prefix run the whole layer, stopped rows' slots are filled;
- ffn: the self-attention runs on every row (filling the stopped rows' slots, no prefix gather), the FFN on
  the active rows only.
Columns: F-evaluations per token relative to r = 3 (counted while decoding), decoding tokens/s relative to
r = 3 (cached greedy, `--prompt` + `--tokens` tokens, median of `--rounds` alternating rounds), and the issue's
goal, speed-up >= 0.8 x the evaluation saving (1 / evaluation ratio). That cached decoding under either path
equals the full forward replaying its decisions is tested in tests/test_adaptive.py, not here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.common import machine
from lit_iiet.nn.decoder import Decoder, DecoderConfig
from lit_iiet.nn.ode import IIETConfig, ODEConfig


@torch.no_grad()
def decode(model: Decoder, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds for cached greedy decoding of `tokens` tokens after the prompt."""
    start = time.perf_counter()
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + tokens)
    logits = model(prompt, cache, 0, last_only=True)
    pos, nxt = prompt.shape[1], logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(tokens - 1):
        logits = model(nxt, cache, pos)
        pos, nxt = pos + 1, logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - start


@torch.no_grad()
def evals_per_token(model: Decoder, prompt: torch.Tensor, tokens: int) -> float:
    """F-evaluations per decoded token and layer over one cached greedy decoding (one new token per row a step)."""
    evals, slots = 0, 0

    def count(module, args, output) -> None:
        nonlocal evals, slots
        if args[0].shape[1] == 1:
            evals += sum(int(c.sum()) for c in trace.counts.values())
            slots += args[0].shape[0] * len(trace.counts)

    with model.update.trace() as trace:
        hook = model.register_forward_hook(count)
        decode(model, prompt, tokens)
        hook.remove()
    return evals / slots


@torch.no_grad()
def median_increment(model: Decoder, prompt: torch.Tensor) -> float:
    """The median relative increment ||z_2 - z_1|| / ||z_1|| over the prompt's tokens and the layers."""
    increments = []

    def observe(layer, states):  # states: y, z_1, z_2, ...
        z1, z2 = states[1].float(), states[2].float()
        increments.append(((z2 - z1).norm(dim=-1) / z1.norm(dim=-1).clamp_min(1e-12)).flatten())

    with model.update.trace(observe=observe):
        model(prompt)
    return float(torch.cat(increments).median())


def build(width: int, ode: ODEConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        vocab_size=2048, n_layers=4, d_model=width, n_heads=width // 32, max_seq_len=512, embed_scale="sqrt_d_model"
    )
    model = Decoder(cfg, ode).eval()
    if ode.iiet.policy == "router":  # trained routers start at zero (all stop); random ones split the tokens
        for router in model.update.routers:
            torch.nn.init.normal_(router.weight, std=width**-0.5)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"Random weights, 4 layers, batch {args.batch}, {args.prompt}-token prompt + {args.tokens} greedy tokens, "
        f"median of {args.rounds} alternating rounds; {machine(torch.device('cpu'))}.\n"
    )
    print("| d_model | policy | compaction | evals vs r=3 | tokens/s vs r=3 | goal (0.8 / evals) |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        fixed = ODEConfig("iiet", 3)
        prompt = torch.randint(4, 2048, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
        threshold = median_increment(build(width, fixed), prompt)
        models = {("fixed", "-"): build(width, fixed)}
        for compaction in ("all", "ffn"):
            residual = IIETConfig(policy="residual", threshold=threshold, early_exit_compaction=compaction)
            models["residual", compaction] = build(width, replace(fixed, iiet=residual))
            router = IIETConfig(policy="router", early_exit_compaction=compaction)
            models["router", compaction] = build(width, replace(fixed, iiet=router))
        seconds = {key: [] for key in models}
        # Also the warm-up: the evaluation counts are the same every round.
        evals = {key: evals_per_token(model, prompt, args.tokens) for key, model in models.items()}
        for _ in range(args.rounds):
            for key, model in models.items():
                seconds[key].append(decode(model, prompt, args.tokens))
        base = statistics.median(seconds["fixed", "-"])
        for (policy, compaction), times in seconds.items():
            ratio = evals[policy, compaction] / evals["fixed", "-"]
            speed = base / statistics.median(times)
            goal = "" if policy == "fixed" else f"{0.8 / ratio:.2f} {'met' if speed >= 0.8 / ratio else 'not met'}"
            print(f"| {width} | {policy} | {compaction} | {ratio:.2f} | {speed:.2f} | {goal} |")


if __name__ == "__main__":
    main()
