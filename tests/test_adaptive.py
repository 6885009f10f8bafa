"""Per-token adaptive iterations: policies, gating, causality, exact caching with early exit, router training."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, TINY
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_iiet.analysis.logs import read_scalars
from lit_iiet.cli import main
from lit_iiet.errors import UserInputError
from lit_iiet.models import LanguageModel
from lit_iiet.nn.decoder import Block, Decoder, DecoderConfig
from lit_iiet.nn.ode import IIETConfig, ODEConfig

VOCAB = 97


def make(ode: ODEConfig, router_seed: int | None = None) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=VOCAB, n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, max_seq_len=40)
    model = Decoder(cfg, ode).eval()
    with torch.no_grad():  # larger weights than the init, so that iterations (and stopping) really differ
        for name, p in model.named_parameters():
            if p.dim() == 2 and "routers" not in name:
                p.mul_(4)
        if router_seed is not None:  # a router that lets some tokens continue and stops others
            torch.manual_seed(router_seed)
            for router in model.update.routers:
                router.weight.normal_(0, 0.5)
                router.bias.zero_()
    return model


def tokens(batch=3, length=20, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def counts_of(trace) -> dict[int, torch.Tensor]:
    return {layer: c.clone() for layer, c in trace.counts.items()}


def replaying(model, decisions: dict[int, torch.Tensor]) -> None:
    """Replace the model's policy by recorded decisions ({layer: iterations per token}): a test double."""
    model.update.decider = lambda layer: lambda k, z, z_prev, active: (decisions[layer] > k, None)


@torch.no_grad()
def test_always_continue_reproduces_fixed_iterations():
    x, fixed = tokens(), make(ODEConfig("iiet", 3))
    for ode in (
        ODEConfig("iiet", 3, iiet=IIETConfig(policy="residual", threshold=0.0)),
        ODEConfig("iiet", 3, iiet=IIETConfig(policy="fixed")),
    ):
        model = make(ode)
        with model.update.trace() as trace:
            torch.testing.assert_close(model(x), fixed(x), atol=1e-5, rtol=0)  # residual: the adaptive code path
        assert all(bool((c == 3).all()) for c in trace.counts.values())
        with model.update.trace(full_iterations=True):
            torch.testing.assert_close(model(x), fixed(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_stopping_after_the_first_iteration_is_the_vanilla_layer():
    """g = 0 stops: a router that stops every token (sigmoid(0) = 0.5 is not > 0.5) gives the euler model."""
    router = make(ODEConfig("iiet", 3, iiet=IIETConfig(policy="router")))
    for r in router.update.routers:
        r.bias.zero_()
    euler = make(ODEConfig("euler"))
    euler.load_state_dict({k: v for k, v in router.state_dict().items() if "routers" not in k})
    x = tokens()
    with router.update.trace() as trace:
        torch.testing.assert_close(router(x), euler(x), atol=1e-5, rtol=0)
    assert all(bool((c == 1).all()) for c in trace.counts.values())


POLICIES = {
    "residual": (ODEConfig("iiet", 3, iiet=IIETConfig(policy="residual", threshold=[0.0, 0.3, 0.3])), None),
    "router": (ODEConfig("iiet", 3, iiet=IIETConfig(policy="router")), 0),
    "residual_shared_kv": (
        ODEConfig("iiet", 3, iiet=IIETConfig(policy="residual", threshold=0.3, kv_mode="shared")),
        None,
    ),
}


@pytest.mark.parametrize("name", POLICIES)
@torch.no_grad()
def test_decisions_never_depend_on_later_tokens(name):
    ode, seed = POLICIES[name]
    model, x = make(ode, seed), tokens()
    with model.update.trace() as trace:
        logits, before = model(x), counts_of(trace)
        future = x.clone()
        future[:, 12:] = tokens(seed=7)[:, 12:]
        logits_future = model(future)
    for layer in before:
        assert torch.equal(trace.counts[layer][:, :12], before[layer][:, :12])
    torch.testing.assert_close(logits_future[:, :12], logits[:, :12], atol=1e-5, rtol=0)
    assert any(bool((c < 3).any()) for c in before.values()), "the policy should stop some tokens early"


def decode_recording_decisions(model, x, prompt=5):
    """Prefill the prompt, then decode token by token over the cache; returns logits and the decisions taken."""
    cache = model.init_cache(x.shape[0], x.shape[1])
    with model.update.trace() as trace:
        logits, decisions = [model(x[:, :prompt], cache, 0)], [counts_of(trace)]
        for t in range(prompt, x.shape[1]):
            logits.append(model(x[:, t : t + 1], cache, t))
            decisions.append(counts_of(trace))
    return torch.cat(logits, 1), {layer: torch.cat([d[layer] for d in decisions], 1) for layer in decisions[0]}


@pytest.mark.parametrize("compaction", ["ffn", "all"])
@pytest.mark.parametrize("name", POLICIES)
@torch.no_grad()
def test_cached_decoding_equals_the_replayed_full_forward(name, compaction):
    """Both early-exit paths (the FFN alone on the active rows, or the whole layer on them and their gathered
    prefix) decode exactly what the full forward computes with the same per-token decisions."""
    ode, seed = POLICIES[name]
    model, x = make(replace(ode, iiet=replace(ode.iiet, early_exit_compaction=compaction)), seed), tokens()
    cached, decisions = decode_recording_decisions(model, x)
    steps = torch.stack([d[:, 5:] for d in decisions.values()])
    assert bool((steps < 3).any()) and bool((steps == 3).any()), "some rows stop while others go on: compaction is used"
    replaying(model, decisions)
    with model.update.trace() as trace:
        full = model(x)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    assert all(torch.equal(trace.counts[layer], decisions[layer]) for layer in decisions)


@torch.no_grad()
def test_without_filling_stopped_slots_the_cache_would_be_wrong(monkeypatch):
    """Negative control: where the whole layer runs on the active rows only, skipping the exact fill leaves stale
    keys that later tokens read."""
    branch = Block.branch

    def no_fill(self, *args, **kwargs):
        G = branch(self, *args, **kwargs)
        G.fill = None
        return G

    ode, _ = POLICIES["residual"]
    model, x = make(replace(ode, iiet=replace(ode.iiet, early_exit_compaction="all"))), tokens()
    monkeypatch.setattr(Block, "branch", no_fill)
    cached, decisions = decode_recording_decisions(model, x)
    replaying(model, decisions)
    assert (cached - model(x)).abs().max() > 1e-3


@torch.no_grad()
def test_shared_kv_is_exact_against_itself_and_an_approximation_of_iiet():
    x = tokens()
    shared, exact = make(ODEConfig("iiet", 3, iiet=IIETConfig(kv_mode="shared"))), make(ODEConfig("iiet", 3))
    cached, _ = decode_recording_decisions(shared, x)
    torch.testing.assert_close(cached, shared(x), atol=1e-4, rtol=0)
    assert sum(len(slots) for slots in shared.init_cache(1, 8)) == 3  # one slot per layer instead of 9
    assert (shared(x) - exact(x)).abs().max() > 1e-3


def test_router_training_is_expert_choice_with_a_causal_aux_target():
    model = make(ODEConfig("iiet", 3, iiet=IIETConfig(policy="router", router_capacity=0.25)), router_seed=0).train()
    x = tokens()
    with model.update.trace() as trace:
        model(x).logsumexp(-1).mean().backward()
    for c in trace.counts.values():
        per_iteration = [(c > k).sum().item() for k in range(3)]
        assert per_iteration[0] == x.numel() and per_iteration[1] == round(0.25 * x.numel()) == per_iteration[2]
    aux = model.update.aux_loss(trace)
    assert aux is not None and aux.item() > 0
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in model.update.routers)


def test_bad_policy_options():
    for kwargs, message in [
        ({"policy": "greedy"}, "unknown iiet.policy 'greedy'; choose one of fixed, residual, router"),
        ({"kv_mode": "paged"}, "unknown iiet.kv_mode 'paged'; choose one of exact, shared"),
        ({"policy": "residual", "output": "mean"}, "needs iiet.unit 'layer'"),
        ({"threshold": -0.1}, "thresholds must be numbers >= 0"),
        ({"router_capacity": 0.0}, "router_capacity=0.0 must lie in"),
    ]:
        with pytest.raises(UserInputError, match=message):
            ODEConfig("iiet", 3, iiet=kwargs)
    with pytest.raises(UserInputError, match="iiet.threshold"):
        Decoder(
            DecoderConfig(VOCAB, n_layers=3, d_model=16, n_heads=2),
            ODEConfig("iiet", 2, iiet=IIETConfig(policy="residual", threshold=[0.1, 0.2])),
        )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("adaptive_teacher")
    main(
        [
            "fit",
            *TINY,
            "--trainer.max_steps",
            "6",
            "--trainer.val_check_interval",
            "6",
            "--trainer.default_root_dir",
            str(run),
        ]
    )
    return run / "checkpoints" / "last.ckpt"


def test_router_distilled_with_iiad_logs_evals_agreement_and_histogram(teacher, tmp_path):
    """The router policy trained by the IIAD callback from the full-iteration teacher, through the CLI."""
    main(
        [
            "fit",
            *TINY,
            "--model.ode.iiet.policy",
            "router",
            "--model.ode.iiet.router_capacity",
            "0.5",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks+=lit_iiet.callbacks.IIAD",
            f"--trainer.callbacks.teacher={teacher}",
            "--trainer.callbacks.threshold=0.0",
        ]
    )
    scalars = read_scalars(tmp_path)
    for tag in ("train/router_aux", "train/kd", "iiet/evals_per_token", "iiet/agreement"):
        assert tag in scalars, tag
    assert 1.0 <= scalars["iiet/evals_per_token"][-1][1] <= 3.0
    assert 0.0 <= scalars["iiet/agreement"][-1][1] <= 1.0
    events = EventAccumulator(str(next(tmp_path.glob("lightning_logs/version_0"))), size_guidance={"histograms": 0})
    events.Reload()
    assert "iiet/evals_per_token" in events.Tags()["histograms"]
    student = LanguageModel.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    teacher_state = torch.load(teacher, weights_only=True)["state_dict"]
    assert not torch.equal(student.state_dict()["model.embed.weight"], teacher_state["model.embed.weight"])
    assert "model.update.routers.0.weight" in student.state_dict()


@pytest.mark.slow
def test_ddp_with_routers_that_a_batch_leaves_unused(tmp_path):
    """Layer 1 runs one iteration, so its router never decides anything; DDP must not fail on it."""
    cmd = [
        sys.executable,
        "-m",
        "lit_iiet",
        "fit",
        *TINY,
        "--config",
        "conf/trainer/ddp_cpu.yaml",
        "--model.ode.iiet.policy",
        "router",
        "--model.ode.iters",
        "[3, 1]",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--model.val_sample_prompt",
        "null",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
