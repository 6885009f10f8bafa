"""What every benchmark shares: the schemes by name, the device and dtype options, and the machine line."""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch

from lit_iiet.nn.ode import ODEConfig

SCHEMES = {
    "euler": ODEConfig("euler"),
    "iiet r=2": ODEConfig("iiet", 2),
    "iiet r=3": ODEConfig("iiet", 3),
    "iiet r=4": ODEConfig("iiet", 4),
    "rk2": ODEConfig("rk2"),
    "rk2_gated": ODEConfig("rk2_gated"),
    "rk4": ODEConfig("rk4"),
    "pcformer": ODEConfig("pcformer", branch_norm=True),
}


def add_shape_args(
    parser: argparse.ArgumentParser,
    d_model: int = 128,
    vocab_size: int = 2048,
    seq_len: int = 128,
    batch_size: int = 16,
) -> None:
    """The model and training-batch shape; defaults are the conf/lm/shakespeare.yaml shape."""
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=d_model)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=vocab_size)
    parser.add_argument("--seq_len", type=int, default=seq_len, help="training sequence length")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="training batch")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (CUDA only)")


def device_and_autocast(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The device, and the autocast context of --dtype; bf16 on a CPU is refused (it measures nothing useful)."""
    device = torch.device(args.device)
    if args.dtype == "bf16" and device.type != "cuda":
        parser.error(
            "--dtype bf16 is only measured on CUDA: bf16 matmuls on these CPUs are about 200x slower than fp32"
        )
    autocast = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    return device, autocast


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer: torch.optim.Optimizer, windows: torch.Tensor, autocast) -> torch.Tensor:
    """One optimizer step of the next-token loss on windows (B, T + 1), the forward under `autocast`: the step
    the speed benchmarks time. Returns the loss (no host sync)."""
    from lit_iiet.nn.decoder import next_token_loss

    with autocast:
        logits = model(windows[:, :-1])
    loss = next_token_loss(logits, windows)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU architecture and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def fit_and_test(args: list[str], run_dir: Path, task: str = "lm") -> dict:
    """`python -m lit_iiet fit ARGS`, then `test` of its last checkpoint, in this process and into run_dir.

    An interrupted fit resumes from its last checkpoint. Returns the val/loss curve [(step, loss)], the final
    val/loss and test/loss, the last validation's `iiet/` scalars and the fit's wall time in seconds. For task
    "mt" (an encoder-decoder config) the losses are the token NLL without label smoothing (`*/nll_loss`), the
    validation decodes nothing (its loss covers the whole split) and the result adds test BLEU and chrF.
    """
    from lit_iiet.analysis.logs import read_scalars
    from lit_iiet.cli import main

    common = [
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    common += ["--model.val_decode_batches", "0"] if task == "mt" else ["--model.val_sample_prompt", "null"]
    last = run_dir / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    main(["fit", *args, *common] + (["--ckpt_path", str(last)] if last.exists() else []))
    fit_seconds = time.perf_counter() - start
    main(["test", *args, *common, "--ckpt_path", str(last)])
    scalars = read_scalars(run_dir / "lightning_logs")
    loss = "nll_loss" if task == "mt" else "loss"
    val = scalars[f"val/{loss}"]
    result = {
        "val_curve": val,
        "val_loss": val[-1][1],
        "test_loss": scalars[f"test/{loss}"][-1][1],
        "iiet": {k: v[-1][1] for k, v in scalars.items() if k.startswith("iiet/")},
        "fit_seconds": fit_seconds,
    }
    if task == "mt":
        result.update(test_bleu=scalars["test/bleu"][-1][1], test_chrf=scalars["test/chrf"][-1][1])
    return result
