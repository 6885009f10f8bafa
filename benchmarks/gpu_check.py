"""One command that tells a GPU user in minutes whether lit_iiet works on their machine, and how fast.

    python -m benchmarks.gpu_check                          # one GPU, bf16-mixed, a 134M model: a few minutes
    python -m benchmarks.gpu_check --device cpu --tiny      # the same code paths on a CPU in half a minute (tests)

Random tokens, so no data is needed. Sections, each reported even when another fails:

* train: euler and IIET r = 3 training steps (forward, backward, AdamW) under bf16 autocast; median step time over rounds that alternate the two schemes, their ratio (IIET
  runs 3 F-evaluations per layer, so about 3x is the ideal), MFU of the matmul FLOPs (`Decoder.flops`, every
  F-evaluation counted, x3 for forward + backward) against the device's dense bf16 peak from its data sheet, and
  each step's activation memory (peak allocated during the step minus what was allocated before it).
* decode: cached greedy decoding, new tokens per second, of our euler model, Hugging Face's LlamaForCausalLM with
  the same weights (both cast to bf16; their fp32 logits are checked equal first) and our IIET r = 3.
* fsdp: Lightning `fit` of an IIET model with FSDPStrategy (one FSDP unit per Block, the InfluenceLogger on)
  against the single-device strategy, per-step training losses compared, in 32-true and in bf16-mixed.
  On one GPU, torch runs FSDP as NO_SHARD; the sharded path itself is tested on CPU (tests/test_fsdp.py).
* compiled: the train section's steps with the model under torch.compile (last: compiling takes a while).
* resume: a `fit` killed with SIGKILL right after the checkpoint of step k, resumed from it, against the same fit
  uninterrupted: per-step losses compared.

Writes `gpu_check.json` and `gpu_check.md` into --out and prints the markdown. Exit status 1 if a check fails
(an error, or losses that differ); speed goals are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import lightning as L
import torch

from benchmarks.common import machine, sync, train_step
from benchmarks.vs_hf_llama import bf16_peak
from lit_iiet.data.lm import PackedLMData
from lit_iiet.models.lm import LanguageModel
from lit_iiet.nn.decoder import Decoder, DecoderConfig
from lit_iiet.nn.generate import generate
from lit_iiet.nn.ode import ODEConfig

SCHEMES = {"euler": ODEConfig("euler"), "iiet r=3": ODEConfig("iiet", 3)}
# (n_layers, d_model, n_heads, vocab, seq_len, batch): GPT-2 small's shape with Llama's vocabulary, and a toy.
SHAPES = {"mid": (12, 768, 12, 32000, 1024, 16), "tiny": (2, 64, 4, 512, 64, 4)}


class RandomTokens(PackedLMData):
    """Uniform random token ids per split, through the project's packed windows and resumable sampler."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, windows: int = 256) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.update(num_workers=0, shuffle=True, prompts=None)

    def has_split(self, split: str) -> bool:
        return True

    def token_stream(self, split: str) -> torch.Tensor:
        h = self.hparams
        g = torch.Generator().manual_seed(("train", "val", "test").index(split))
        return torch.randint(0, h.vocab_size, (h.windows * h.seq_len + 1,), generator=g)


class LossRecorder(L.Callback):
    """Appends (step, training loss) to a JSON-lines file after every step, so a killed run leaves its losses."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps([trainer.global_step, outputs["loss"].item()]) + "\n")


class KillAfterCheckpoint(L.Callback):
    """SIGKILL this process once the checkpoint of step `step` is on disk: a crash with no cleanup at all."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning runs ModelCheckpoint's hooks last, so the checkpoint of step k is on disk once step k + 1 starts.
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def lightning_model(shape: tuple, ode: ODEConfig, steps: int) -> LanguageModel:
    n_layers, d_model, n_heads, vocab, seq_len, _ = shape
    arch = DecoderConfig(vocab, n_layers, d_model, n_heads, max_seq_len=seq_len, embed_scale="sqrt_d_model")
    return LanguageModel(arch=arch, ode=ode, optim={"lr": 3e-4, "warmup_steps": 2, "total_steps": steps})


def lightning_fit(args, out: Path, shape: tuple, ode: ODEConfig, steps: int, precision: str, **options) -> list:
    """Fit `steps` steps on random tokens; returns [(step, loss)]. options: strategy, callbacks, ckpt_path, ..."""
    seed = 1234
    L.seed_everything(seed, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    losses = out / "losses.jsonl"
    if options.get("ckpt_path") is None:  # a resumed fit appends to the interrupted one's losses
        losses.unlink(missing_ok=True)
    callbacks = [LossRecorder(losses), *options.pop("callbacks", [])]
    every = options.pop("checkpoint_every", None)
    if every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(out / "checkpoints", every_n_train_steps=every, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator=args.device.split(":")[0].replace("cuda", "gpu"),
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=2,
        val_check_interval=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        deterministic="warn",  # deterministic kernels where torch has them (not flash attention's backward)
        callbacks=callbacks,
        strategy=options.pop("strategy", "auto"),
    )
    data = RandomTokens(shape[3], shape[4], shape[5])
    trainer.fit(lightning_model(shape, ode, steps), data, ckpt_path=options.pop("ckpt_path", None))
    return [tuple(json.loads(line)) for line in losses.read_text().splitlines()]


# --- the sections ----------------------------------------------------------------------------------------------


def check_train(args, shape: tuple, device: torch.device, report: dict, compiled: bool = False) -> None:
    n_layers, d_model, n_heads, vocab, seq_len, batch = shape
    cuda = device.type == "cuda"
    cfg = DecoderConfig(vocab, n_layers, d_model, n_heads, max_seq_len=seq_len, embed_scale="sqrt_d_model")
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen).to(device)
    peak = bf16_peak(machine(device)) if cuda else None
    train = report.setdefault("train", {"variants": {}})
    train["params"] = sum(p.numel() for p in Decoder(cfg, ODEConfig()).parameters())
    if cuda and "matmul_tflops" not in train:  # the ceiling actually reached on this card, for scale
        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        times = []
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            for _ in range(10):
                a @ b
            sync(device)
            times.append((time.perf_counter() - start) / 10)
        train["matmul_tflops"] = 2 * 8192**3 / statistics.median(times[1:]) / 1e12
    train["variants"]["compiled" if compiled else "eager"] = time_schemes(args, cfg, windows, device, peak, compiled)
    if cuda:
        torch.cuda.empty_cache()


def time_schemes(args, cfg: DecoderConfig, windows: torch.Tensor, device: torch.device, peak, compiled: bool) -> dict:
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    batch, seq_len = windows.shape[0], windows.shape[1] - 1
    arms = {}
    for name, ode in SCHEMES.items():
        torch.manual_seed(0)
        model = Decoder(cfg, ode).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        forward = torch.compile(model) if compiled else model

        def step(forward=forward, optimizer=optimizer) -> torch.Tensor:
            return train_step(forward, optimizer, windows, autocast)

        start = time.perf_counter()
        step()  # compiles, if it does
        sync(device)
        warmup_s = time.perf_counter() - start
        for _ in range(2):
            step()
        sync(device)
        memory = None
        if cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync(device)
            memory = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        arms[name] = dict(step=step, flops=3 * model.flops(batch, seq_len), memory=memory, warmup_s=warmup_s)
    times = {name: [] for name in arms}
    for _ in range(args.rounds):  # alternate the schemes, so drifting clocks hit both
        for name, arm in arms.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                arm["step"]()
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    variant = {}
    for name, arm in arms.items():
        t = statistics.median(times[name])
        variant[name] = {
            "step_s": t,
            "tokens_per_s": batch * seq_len / t,
            "tflops": arm["flops"] / t / 1e12,
            "mfu": arm["flops"] / t / peak if peak else None,
            "activation_gib": arm["memory"],
            "first_step_s": arm["warmup_s"],
        }
    variant["ratio"] = variant["iiet r=3"]["step_s"] / variant["euler"]["step_s"]
    return variant


def check_decode(args, shape: tuple, device: torch.device, report: dict) -> None:
    import transformers

    from lit_iiet.hf_llama import llama_config_from_decoder, to_llama_state

    n_layers, d_model, n_heads, vocab, _, _ = shape
    prompt_len, new = args.prompt, args.new_tokens
    cfg = DecoderConfig(vocab, n_layers, d_model, n_heads, max_seq_len=prompt_len + new)
    torch.manual_seed(0)
    ours = Decoder(cfg, ODEConfig("euler")).to(device).eval()
    iiet = Decoder(cfg, ODEConfig("iiet", 3)).to(device).eval()
    iiet.load_state_dict(ours.state_dict())
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**llama_config_from_decoder(cfg), attn_implementation="sdpa")
    )
    hf.load_state_dict(to_llama_state(ours.state_dict(), cfg))
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # exactly `new` tokens per row, as ours
    hf.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab, (2, min(32, cfg.max_seq_len)), generator=gen).to(device)
    with torch.no_grad():
        diff = (ours(probe) - hf(input_ids=probe, use_cache=False).logits).abs().max().item()
    report["decode"] = {"fp32_max_logit_diff": diff, "batches": {}}
    if not diff <= 1e-3:
        raise AssertionError(f"our and HF logits differ by {diff:.3g} in fp32: the decode comparison would be void")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for model in (ours, iiet, hf):
        model.to(dtype)
    runs = {
        "ours euler": lambda p: generate(ours, p, new, temperature=0.0),
        "HF Llama": lambda p: hf.generate(
            input_ids=p,
            attention_mask=torch.ones_like(p),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
        ),
        "ours iiet r=3": lambda p: generate(iiet, p, new, temperature=0.0),
    }
    for b in args.decode_batches:
        prompt = torch.randint(0, vocab, (b, prompt_len), generator=gen).to(device)
        times = {name: [] for name in runs}
        outputs = {name: run(prompt) for name, run in runs.items()}  # warm-up
        for _ in range(args.decode_rounds):
            for name, run in runs.items():
                sync(device)
                start = time.perf_counter()
                run(prompt)
                sync(device)
                times[name].append(time.perf_counter() - start)
        speeds = {name: b * new / statistics.median(t) for name, t in times.items()}
        agree = (outputs["ours euler"][:, prompt_len:] == outputs["HF Llama"][:, prompt_len:]).float().mean().item()
        report["decode"]["batches"][b] = {"tokens_per_s": speeds, "greedy_agreement": agree}


def check_fsdp(args, shape: tuple, out: Path, report: dict) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    from lit_iiet.callbacks import InfluenceLogger
    from lit_iiet.nn.decoder import Block
    from lit_iiet.strategies import CPUFSDPStrategy

    report["fsdp"] = {}
    cpu = args.device == "cpu"
    for precision in ["32-true"] if cpu else ["32-true", "bf16-mixed"]:
        single = lightning_fit(
            args, out / f"single_{precision}", shape, ODEConfig("iiet", 3), args.fit_steps, precision
        )
        options = dict(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD", state_dict_type="full")
        strategy = CPUFSDPStrategy(process_group_backend="gloo", **options) if cpu else FSDPStrategy(**options)
        sharded = lightning_fit(
            args,
            out / f"fsdp_{precision}",
            shape,
            ODEConfig("iiet", 3),
            args.fit_steps,
            precision,
            strategy=strategy,
            callbacks=[InfluenceLogger(batches=1)],
        )
        diff = max(abs(a[1] - b[1]) for a, b in zip(single, sharded))
        report["fsdp"][precision] = {
            "single": single,
            "fsdp": sharded,
            "max_abs_diff": diff,
            "steps_equal": [s for s, _ in single] == [s for s, _ in sharded],
        }


def check_resume(args, shape: tuple, out: Path, report: dict) -> None:
    steps, kill_at = args.fit_steps, args.fit_steps // 2
    precision = "bf16-mixed" if args.device != "cpu" else "32-true"
    whole = lightning_fit(args, out / "uninterrupted", shape, ODEConfig("iiet", 3), steps, precision)
    run_dir = out / "interrupted"
    worker = [sys.executable, "-m", "benchmarks.gpu_check", *sys.argv[1:], "--_worker_kill_at", str(kill_at)]
    worker += ["--_worker_dir", str(run_dir)]
    killed = subprocess.run(worker, capture_output=True, text=True)
    ckpt = run_dir / "checkpoints" / f"epoch=0-step={kill_at}.ckpt"
    report["resume"] = {"killed_returncode": killed.returncode}
    if killed.returncode != -signal.SIGKILL or not ckpt.exists():
        raise AssertionError(f"the worker was to die by SIGKILL after step {kill_at}: {killed.stderr[-2000:]}")
    before = [tuple(json.loads(line)) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    after = lightning_fit(args, run_dir, shape, ODEConfig("iiet", 3), steps, precision, ckpt_path=ckpt)
    resumed = after if len(after) == steps else before + after[len(before) :]
    report["resume"].update(
        uninterrupted=whole,
        resumed=resumed,
        max_abs_diff=max(abs(a[1] - b[1]) for a, b in zip(whole, resumed)),
        steps_equal=[s for s, _ in whole] == [s for s, _ in resumed],
    )


# --- report ----------------------------------------------------------------------------------------------------


def markdown(report: dict, args) -> str:
    lines = [
        f"GPU check, {report['date']}, {report['machine']}, torch {report['torch']}, lightning {report['lightning']}. "
        f"Command: `python -m benchmarks.gpu_check {shlex.join(report['argv'])}`",
        "",
    ]
    if "train" in report:
        t = report["train"]
        lines += [
            f"Training step (fwd + bwd + AdamW), {t['params'] / 1e6:.0f}M parameters, batch {args.shape[5]} x "
            f"{args.shape[4]}, {'bf16 autocast' if args.device != 'cpu' else 'fp32'}, median of {args.rounds} "
            f"alternating rounds of {args.steps} steps. MFU against the data sheet's dense bf16 peak"
            + (
                f"; a bf16 8192^3 matmul reached {t['matmul_tflops']:.0f} TFLOP/s here."
                if "matmul_tflops" in t
                else "."
            ),
            "",
            "| variant | scheme | step time (ms) | tokens/s | TFLOP/s | MFU | activation memory (GiB) | IIET / euler |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for variant, arms in t["variants"].items():
            for name in SCHEMES:
                a = arms[name]
                mfu = f"{100 * a['mfu']:.1f}%" if a["mfu"] else "n/a"
                mem = f"{a['activation_gib']:.2f}" if a["activation_gib"] is not None else "n/a"
                ratio = f"{arms['ratio']:.2f}x" if name != "euler" else ""
                lines.append(
                    f"| {variant} | {name} | {1e3 * a['step_s']:.1f} | {a['tokens_per_s']:,.0f} | {a['tflops']:.2f} | "
                    f"{mfu} | {mem} | {ratio} |"
                )
        lines.append("")
    if "decode" in report:
        d = report["decode"]
        lines += [
            f"Cached greedy decoding, {args.prompt} prompt + {args.new_tokens} new tokens per row, new tokens/s "
            f"(fp32 logits of ours and HF differ by at most {d['fp32_max_logit_diff']:.1g}):",
            "",
            "| batch | ours euler | HF Llama | ours / HF | ours IIET r=3 | greedy tokens equal to HF |",
            "|---|---|---|---|---|---|",
        ]
        for b, r in d["batches"].items():
            s = r["tokens_per_s"]
            lines.append(
                f"| {b} | {s['ours euler']:,.0f} | {s['HF Llama']:,.0f} | {s['ours euler'] / s['HF Llama']:.2f} | "
                f"{s['ours iiet r=3']:,.0f} | {100 * r['greedy_agreement']:.0f}% |"
            )
        lines.append("")
    for section, what in (("fsdp", "FSDP against the single-device strategy"), ("resume", "kill -9 and resume")):
        if section not in report:
            continue
        rows = report[section] if section == "fsdp" else {"": report[section]}
        for precision, r in rows.items():
            lines.append(
                f"- {what}{f' ({precision})' if precision else ''}: max |loss difference| over "
                f"{len(r.get('single', r.get('uninterrupted', [])))} steps {r['max_abs_diff']:.2g}"
                f"{'' if r['steps_equal'] else ', steps differ'}"
            )
    for section, error in report["errors"].items():
        lines.append(f"- **{section} failed**: {error.strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a toy shape: the code paths in seconds (tests, CPU)")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["train", "decode", "fsdp", "resume", "compiled"],
        default=None,
        help="default: all; 'compiled' (training steps under torch.compile) only on CUDA",
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating timing rounds (default 5, tiny 2)")
    parser.add_argument("--decode_rounds", type=int, default=None, help="decoding rounds (default 3, tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps timed per round (default 5, tiny 1)")
    parser.add_argument("--fit_steps", type=int, default=None, help="steps of each Lightning fit (default 10, tiny 4)")
    parser.add_argument("--seq_len", type=int, default=None, help="training sequence length (default 1024, tiny 64)")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default 16, tiny 4)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=None, help="default 128, tiny 8")
    parser.add_argument("--decode_batches", type=int, nargs="+", default=None, help="default 1 16, tiny 2")
    parser.add_argument("--tolerance", type=float, default=None, help="max |loss difference| (default 1e-4)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--_worker_kill_at", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_worker_dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.tiny
    n_layers, d_model, n_heads, vocab, seq_len, batch = SHAPES["tiny" if tiny else "mid"]
    args.shape = (n_layers, d_model, n_heads, vocab, args.seq_len or seq_len, args.batch_size or batch)
    defaults = dict(
        rounds=2 if tiny else 5, decode_rounds=1 if tiny else 3, steps=1 if tiny else 5, fit_steps=4 if tiny else 10
    )
    defaults.update(new_tokens=8 if tiny else 128, decode_batches=[2] if tiny else [1, 16], tolerance=1e-4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (torch.cuda.is_available() is False); use --device cpu --tiny")
    if device.type == "cpu" and not tiny:
        parser.error("--device cpu measures nothing useful at the mid-size shape; add --tiny")
    if args.sections is None:
        args.sections = ["train", "decode", "fsdp", "resume"] + (["compiled"] if device.type == "cuda" else [])

    if args._worker_kill_at is not None:  # the resume check's victim
        lightning_fit(
            args,
            args._worker_dir,
            args.shape,
            ODEConfig("iiet", 3),
            args.fit_steps,
            "bf16-mixed" if device.type == "cuda" else "32-true",
            callbacks=[KillAfterCheckpoint(args._worker_kill_at)],
            checkpoint_every=args._worker_kill_at,
        )
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "date": str(date.today()),
        "machine": machine(device),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "argv": sys.argv[1:],
        "errors": {},
    }
    checks = {
        "train": lambda: check_train(args, args.shape, device, report),
        "compiled": lambda: check_train(args, args.shape, device, report, compiled=True),
        "decode": lambda: check_decode(args, args.shape, device, report),
        "fsdp": lambda: check_fsdp(args, args.shape, args.out / "fsdp", report),
        "resume": lambda: check_resume(args, args.shape, args.out / "resume", report),
    }
    for section in args.sections:
        start = time.perf_counter()
        try:
            checks[section]()
        except Exception:  # one broken section must not hide the others' figures
            report["errors"][section] = traceback.format_exc()
            print(report["errors"][section], file=sys.stderr)
        report.setdefault("seconds", {})[section] = time.perf_counter() - start
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"[gpu_check] {section}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    for section in ("fsdp", "resume"):
        rows = report.get(section, {})
        for r in rows.values() if section == "fsdp" else [rows] if rows else []:
            bf16 = r is report.get("fsdp", {}).get("bf16-mixed")  # FSDP casts the weights to bf16; autocast does not
            if not r["steps_equal"] or (r["max_abs_diff"] > args.tolerance and not bf16):
                report["errors"].setdefault(section, f"losses differ by {r['max_abs_diff']:.3g} > {args.tolerance}")
    text = markdown(report, args)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
