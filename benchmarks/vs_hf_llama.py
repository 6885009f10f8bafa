"""Our euler Transformer++ against Hugging Face's LlamaForCausalLM with the same weights, measured in one run.

    python -m benchmarks.vs_hf_llama                          # small fp32 CPU shape, a few minutes on 2 cores
    python -m benchmarks.vs_hf_llama --device cuda --dtype bf16 --n_layers 12 --d_model 1536 --n_heads 12 \
        --vocab_size 32000 --seq_len 2048 --batch_size 8 --decode_batches 1 8 64

Both models are built from one `DecoderConfig`: ours is `Decoder(cfg, ODEConfig("euler"))`, Hugging Face's is
`LlamaForCausalLM` from `llama_config_from_decoder(cfg)` (attn_implementation="sdpa") with our weights copied in
by `to_llama_state`. The run first checks, in fp32 and without autocast, that both give the same logits (max
abs difference <= 1e-4) and aborts with exit status 1 if not: from then on both compute the same function and
only the speed of computing it differs.

Measured, each as a ratio ours / HF (> 1 means ours is faster), median over rounds that alternate ours, HF:

* cached greedy decoding: `generate(ours, prompt, n, temperature=0.0)` against
  `hf.generate(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True)` with eos disabled, so both
  produce exactly n tokens per row; new tokens per second, for each `--decode_batches` size. In fp32 the greedy
  tokens of the two must be identical (exit status 1 otherwise); under bf16 their agreement is only reported.
* training: forward, the same `F.cross_entropy` on fp32 logits, backward and an AdamW step on the same batch
  (HF is called with `use_cache=False`, so neither builds a KV cache); tokens per second.

Achieved FLOP/s of the training step: the matmul FLOPs of one step (forward + backward; AdamW and element-wise
ops are not counted) are counted exactly by `torch.utils.flop_counter.FlopCounterMode`, with the CPU flash
attention kernels added (torch counts SDPA only on CUDA). Attention is counted as a full T x T product, causal
or not, as torch does. For comparison the table also gives the textbook count

    6 * N * tokens + 12 * n_layers * d_model * seq_len * tokens

with N the parameters of all matmuls (every layer's projections and the output head, not the embedding) and
tokens = batch * seq_len: 2 FLOPs per weight per token forward, twice that backward, and the two attention
products QK^T and PV of 2 * seq_len * d_model FLOPs per token each, times 3 for forward + backward.
torch counts the attention backward as 5 products (it recomputes the scores), the textbook as 4, so
counted / textbook sits slightly above 1 where attention matters.
Achieved FLOP/s = counted FLOPs / median step time; it is compared with the machine's matmul peak measured in
the same run, as a third member of every round: a `--gemm_n`-square matmul in the run's dtype (fp32 on CPU,
about 170 GFLOP/s on our 2-core machines; bf16 or fp32 on CUDA). On CUDA with bf16 the table adds MFU against
the card's dense bf16 peak from its data sheet, when the device name is known (H100 SXM, H200, ...).
Absolute tokens/s are printed only on CUDA (docs/DESIGN.md, section 6).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from datetime import date

import torch
from torch.utils import flop_counter

from benchmarks.common import (
    add_device_args,
    add_shape_args,
    device_and_autocast,
    machine,
    sync,
)
from lit_iiet.hf_llama import llama_config_from_decoder, to_llama_state
from lit_iiet.nn.decoder import Decoder, DecoderConfig, next_token_loss
from lit_iiet.nn.generate import generate
from lit_iiet.nn.ode import ODEConfig

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, without sparsity); matched in order.
BF16_PEAKS = [("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12)]


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_PEAKS:
        if key in device_name:
            return peak
    return None


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn) -> int:
    """Matmul FLOPs (mm, bmm, addmm, SDPA; CPU flash attention included) of one call of fn."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def textbook_flops(cfg: DecoderConfig, d_ff: int, batch: int, seq_len: int) -> int:
    head_dim, kv_heads = cfg.d_model // cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    per_layer = cfg.d_model * (cfg.n_heads * head_dim + 2 * kv_heads * head_dim) + cfg.n_heads * head_dim * cfg.d_model
    per_layer += 3 * cfg.d_model * d_ff
    n_matmul = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size
    tokens = batch * seq_len
    return 6 * n_matmul * tokens + 12 * cfg.n_layers * cfg.d_model * seq_len * tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser, d_model=256, vocab_size=4096, seq_len=256, batch_size=8)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps timed per model and round")
    parser.add_argument("--prompt", type=int, default=16, help="decoding prompt length")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens decoded per row")
    parser.add_argument("--decode_batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--gemm_n", type=int, default=None, help="size of the square peak matmul (default 2048 CPU, 8192 CUDA)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    add_device_args(parser)
    args = parser.parse_args()

    import transformers

    device, autocast = device_and_autocast(parser, args)
    cuda = device.type == "cuda"
    max_len = max(args.seq_len, args.prompt + args.new_tokens)
    cfg = DecoderConfig(args.vocab_size, args.n_layers, args.d_model, args.n_heads, max_seq_len=max_len)

    torch.manual_seed(0)
    ours = Decoder(cfg, ODEConfig("euler"))
    hf_config = transformers.LlamaConfig(**llama_config_from_decoder(cfg), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(to_llama_state(ours.state_dict(), cfg), strict=True)
    ours, hf = ours.to(device).eval(), hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # exactly new_tokens tokens per row, as ours
    hf.generation_config.pad_token_id = 0

    # --- the two compute the same function -------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, cfg.vocab_size, (2, min(64, max_len)), generator=gen).to(device)
    with torch.no_grad():
        logit_diff = (ours(probe) - hf(input_ids=probe, use_cache=False).logits).abs().max().item()
    if not logit_diff <= 1e-4:
        print(
            f"FAIL: ours and HF logits differ by {logit_diff:.3g} > 1e-4 in fp32; the comparison would be meaningless"
        )
        return 1

    # --- cached greedy decoding ----------------------------------------------------------------------------
    def decode_ours(prompt: torch.Tensor) -> torch.Tensor:
        with autocast:
            return generate(ours, prompt, args.new_tokens, temperature=0.0, use_cache=True)

    def decode_hf(prompt: torch.Tensor) -> torch.Tensor:
        with autocast:
            return hf.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                use_cache=True,
            )

    prompts = {
        b: torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=gen).to(device) for b in args.decode_batches
    }
    agreement: dict[int, float] = {}
    for b, prompt in prompts.items():  # warm-up and the token check
        a, h = decode_ours(prompt), decode_hf(prompt)
        if a.shape != h.shape:
            print(f"FAIL: batch {b}: ours decoded {tuple(a.shape)}, HF {tuple(h.shape)} tokens")
            return 1
        agreement[b] = (a[:, args.prompt :] == h[:, args.prompt :]).float().mean().item()
        if args.dtype == "fp32" and agreement[b] < 1.0:
            print(f"FAIL: batch {b}: greedy tokens of ours and HF agree on only {100 * agreement[b]:.1f}% in fp32")
            return 1

    def timed(fn, *fn_args) -> float:
        sync(device)
        start = time.perf_counter()
        fn(*fn_args)
        sync(device)
        return time.perf_counter() - start

    decode_times = {(name, b): [] for b in prompts for name in ("ours", "hf")}
    for _ in range(args.rounds):
        for b, prompt in prompts.items():
            decode_times["ours", b].append(timed(decode_ours, prompt))
            decode_times["hf", b].append(timed(decode_hf, prompt))

    # --- training step and the matmul peak -----------------------------------------------------------------
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    ours.train()
    hf.train()
    models = {  # name: (token ids -> logits, optimizer)
        "ours": (lambda x: ours(x), torch.optim.AdamW(ours.parameters(), lr=1e-4)),
        "hf": (lambda x: hf(input_ids=x, use_cache=False).logits, torch.optim.AdamW(hf.parameters(), lr=1e-4)),
    }

    def forward_backward(name: str) -> None:
        logits_of, _ = models[name]
        with autocast:
            logits = logits_of(batch[:, :-1])
        next_token_loss(logits, batch).backward()

    def train_steps(name: str) -> None:
        optimizer = models[name][1]
        for _ in range(args.steps):
            forward_backward(name)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    flops = {}
    for name, (_, optimizer) in models.items():
        flops[name] = count_flops(lambda: forward_backward(name))  # noqa: B023 - called at once
        optimizer.zero_grad(set_to_none=True)
        train_steps(name)  # warm-up

    gemm_n = args.gemm_n or (8192 if cuda else 2048)
    gemm_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ga, gb = (torch.randn(gemm_n, gemm_n, generator=gen).to(device, gemm_dtype) for _ in range(2))
    gc = torch.empty(gemm_n, gemm_n, device=device, dtype=gemm_dtype)
    gemm_reps = 3 if not cuda else 20

    def gemm() -> None:
        for _ in range(gemm_reps):
            torch.matmul(ga, gb, out=gc)

    gemm()
    train_times: dict[str, list[float]] = {"ours": [], "hf": [], "gemm": []}
    for _ in range(args.rounds):
        for name in models:
            train_times[name].append(timed(train_steps, name) / args.steps)
        train_times["gemm"].append(timed(gemm) / gemm_reps)

    # --- report ---------------------------------------------------------------------------------------------
    med = {k: statistics.median(v) for k, v in {**decode_times, **train_times}.items()}
    peak = 2 * gemm_n**3 / med["gemm"]
    tokens = args.batch_size * args.seq_len
    where = machine(device)
    print(
        f"Ours (euler Transformer++) vs Hugging Face LlamaForCausalLM (transformers {transformers.__version__}, sdpa), same weights "
        f"(max |logit diff| {logit_diff:.1g} in fp32), {date.today()}, {where}, torch {torch.__version__}, {args.dtype}; "
        f"{args.n_layers} layers x {args.d_model}, {args.n_heads} heads, vocab {args.vocab_size}; "
        f"median of {args.rounds} alternating rounds. Command: "
        f"`python -m benchmarks.vs_hf_llama {shlex.join(sys.argv[1:])}`\n"
    )
    absolute = " ours tokens/s | HF tokens/s |" if cuda else ""
    print("| measure | ours / HF speed (> 1: ours faster) | greedy tokens agree |" + absolute)
    print("|---|---|---|" + ("---|---|" if cuda else ""))
    for b in prompts:
        t_ours, t_hf = med["ours", b], med["hf", b]
        n = b * args.new_tokens
        cells = f" {n / t_ours:.0f} | {n / t_hf:.0f} |" if cuda else ""
        print(
            f"| cached greedy decode, batch {b}, {args.prompt} + {args.new_tokens} tokens | {t_hf / t_ours:.2f} | "
            f"{100 * agreement[b]:.1f}% |{cells}"
        )
    cells = f" {tokens / med['ours']:.0f} | {tokens / med['hf']:.0f} |" if cuda else ""
    print(
        f"| training step (fwd + bwd + AdamW), batch {args.batch_size} x {args.seq_len} | {med['hf'] / med['ours']:.2f} | n/a |{cells}"
    )

    spec = bf16_peak(where) if cuda and args.dtype == "bf16" else None
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    print(
        f"\nTraining-step matmul FLOPs (FlopCounterMode, forward + backward) against the measured {gemm_n}^3 "
        f"{'bf16' if args.dtype == 'bf16' else 'fp32'} matmul peak of {peak / scale:.1f} {unit}"
        + (f" and the {where} data-sheet dense bf16 peak of {spec / 1e12:.0f} TFLOP/s" if spec else "")
        + ".\n"
    )
    textbook = textbook_flops(cfg, hf_config.intermediate_size, args.batch_size, args.seq_len)
    print(
        f"| model | GFLOP / step (counted) | counted / textbook | achieved {unit} | achieved / measured peak |"
        + (" MFU (data-sheet bf16 peak) |" if spec else "")
    )
    print("|---|---|---|---|---|" + ("---|" if spec else ""))
    for name, label in (("ours", "ours"), ("hf", "HF Llama")):
        achieved = flops[name] / med[name]
        mfu = f" {100 * achieved / spec:.1f}% |" if spec else ""
        print(
            f"| {label} | {flops[name] / 1e9:.2f} | {flops[name] / textbook:.3f} | {achieved / scale:.1f} | "
            f"{100 * achieved / peak:.1f}% |{mfu}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
