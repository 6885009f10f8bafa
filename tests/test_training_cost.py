"""What a training step costs: FLOP counts (every F-evaluation), activation checkpointing, torch.compile."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lit_iiet.errors import UserInputError
from lit_iiet.models import LanguageModel
from lit_iiet.nn.decoder import Decoder, DecoderConfig
from lit_iiet.nn.ode import ODEConfig
from lit_iiet.nn.seq2seq import Seq2Seq, Seq2SeqConfig

SCHEMES = {
    "euler": ODEConfig("euler"),
    "iiet_schedule": ODEConfig("iiet", [3, 2]),
    "rk2_gated": ODEConfig("rk2_gated"),
    "rk4": ODEConfig("rk4"),
    "pcformer": ODEConfig("pcformer", branch_norm=True),
}


def counted_flops(fn) -> int:
    """torch's own count; the math SDPA backend exposes attention as matmuls it can count."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("ode", SCHEMES.values(), ids=SCHEMES.keys())
def test_decoder_flops_equal_torch_flop_counter(ode):
    model = Decoder(DecoderConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64), ode)
    x = torch.randint(0, 100, (3, 20))
    assert model.flops(3, 20) == counted_flops(lambda: model(x))


def test_flops_scale_with_evaluations():
    """IIET with r iterations costs r vanilla layers (plus the shared embedding and head)."""
    cfg = DecoderConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=4, max_seq_len=64)
    euler, iiet = Decoder(cfg, ODEConfig("euler")), Decoder(cfg, ODEConfig("iiet", 3))
    head = 2 * 4 * 16 * 64 * 100
    assert iiet.flops(4, 16) - head == 3 * (euler.flops(4, 16) - head)


@pytest.mark.parametrize("ffn", ["relu", "swiglu"])
def test_seq2seq_flops_equal_torch_flop_counter(ffn):
    cfg = Seq2SeqConfig(vocab_size=100, d_model=64, n_heads=4, enc_layers=2, dec_layers=3, d_ff=96, ffn=ffn)
    model = Seq2Seq(cfg, ODEConfig("iiet", 3), ODEConfig("rk2_gated"))
    src, tgt = torch.randint(0, 100, (2, 11)), torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    assert model.flops(2, 11, 7) == counted_flops(lambda: model(src, mask, tgt))


def gradients(ode: ODEConfig, checkpointing: str, dropout: float = 0.1) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Decoder(
        DecoderConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=2, max_seq_len=32, dropout=dropout), ode
    )
    x = torch.randint(0, 50, (2, 12))
    torch.manual_seed(1)  # the same dropout masks in every run; checkpointing must replay them on recomputation
    model(x, checkpointing=checkpointing).logsumexp(-1).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "ode, mode",
    [
        (ODEConfig("iiet", 3), "layer"),
        (ODEConfig("iiet", 3), "iteration"),
        (ODEConfig("pcformer", branch_norm=True), "iteration"),
        (ODEConfig("rk4"), "layer"),
    ],
    ids=["iiet-layer", "iiet-iteration", "pcformer-iteration", "rk4-layer"],
)
def test_activation_checkpointing_keeps_gradients(ode, mode):
    plain, checkpointed = gradients(ode, "none"), gradients(ode, mode)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_bad_values():
    with pytest.raises(
        UserInputError, match="activation_checkpointing='layers'; choose 'none', 'layer' or 'iteration'"
    ):
        LanguageModel(activation_checkpointing="layers")
    with pytest.raises(UserInputError, match="does not support scheme 'pcformer'"):
        LanguageModel(ode=ODEConfig("pcformer"), activation_checkpointing="layer")


@pytest.mark.slow
def test_compiled_model_computes_the_same_and_keeps_checkpoint_keys():
    arch = DecoderConfig(vocab_size=100, n_layers=2, d_model=32, n_heads=2, max_seq_len=32)
    torch.manual_seed(0)
    eager = LanguageModel(arch=arch, ode=ODEConfig("iiet", 2))
    torch.manual_seed(0)
    compiled = LanguageModel(arch=arch, ode=ODEConfig("iiet", 2), compile=True)
    compiled.configure_model()
    assert compiled.model._compiled_call_impl is not None
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x = torch.randint(0, 100, (2, 16))
    out_eager, out_compiled = eager(x), compiled(x)
    out_eager.square().mean().backward()
    out_compiled.square().mean().backward()
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
