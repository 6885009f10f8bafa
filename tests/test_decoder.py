"""The decoder-only model: the KV-cache rule (cached decoding == full forward) and generation."""

import pytest
import torch

from lit_iiet.errors import UserInputError
from lit_iiet.nn.decoder import Decoder, DecoderConfig
from lit_iiet.nn.generate import generate, sample_next
from lit_iiet.nn.ode import IIETConfig, ODEConfig

VOCAB = 97

CASES = {
    "euler": ODEConfig("euler"),
    "iiet_r3": ODEConfig("iiet", 3),
    "iiet_schedule": ODEConfig("iiet", [1, 3, 2]),
    "iiet_sublayer": ODEConfig("iiet", 2, iiet=IIETConfig(unit="sublayer")),
    "iiet_mean_damped": ODEConfig("iiet", 3, iiet=IIETConfig(output="mean", damping=0.7)),
    "iiet_anderson": ODEConfig("iiet", [3, 4, 2], iiet=IIETConfig(solver="anderson")),
    "iiet_relaxation": ODEConfig("iiet", 3, iiet=IIETConfig(relaxation="learned", damping=0.7)),
    "looped_schedule": ODEConfig("looped", [2, 3, 1]),
    "rk2": ODEConfig("rk2"),
    "rk2_gated": ODEConfig("rk2_gated"),
    "rk4": ODEConfig("rk4"),
    "pcformer": ODEConfig("pcformer", branch_norm=True),
}


def make(ode: ODEConfig, n_kv_heads=None) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=VOCAB, n_layers=3, d_model=48, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=40)
    model = Decoder(cfg, ode).eval()
    with torch.no_grad():  # larger weights than the init, so that iterations and cache slots really differ
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] != 1:
                p.normal_(0, 0.15)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decoding_equals_full_forward(name):
    """Prefill, single tokens and a multi-token chunk through the cache reproduce the full forward's logits."""
    model = make(CASES[name], n_kv_heads=2 if name == "iiet_r3" else None)
    idx = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = model.init_cache(3, 20)
    pieces, pos = [], 0
    for length in (7, 1, 1, 3, 8):
        pieces.append(model(idx[:, pos : pos + length], cache, pos))
        pos += length
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)


def test_cache_has_one_slot_per_evaluation():
    model = make(ODEConfig("iiet", [1, 3, 2]))
    assert [len(slots) for slots in model.init_cache(1, 8)] == [1, 3, 2]
    assert [len(slots) for slots in make(ODEConfig("pcformer")).init_cache(1, 8)] == [3, 3, 3]


def test_one_shared_slot_per_layer_would_be_wrong():
    """The test above can fail: letting every iteration read the last iteration's keys changes the logits."""
    model = make(ODEConfig("iiet", 3))
    idx = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    cache = model.init_cache(1, 12)
    model(idx[:, :8], cache, 0)
    for slots in cache:  # overwrite every slot with the final iteration's keys and values
        for slot in slots[:-1]:
            slot.k.copy_(slots[-1].k)
            slot.v.copy_(slots[-1].v)
    step = model(idx[:, 8:], cache, 8)
    assert (step - full[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["euler", "iiet_schedule", "rk2_gated", "pcformer"])
def test_greedy_generation_cached_equals_uncached(name):
    model = make(CASES[name])
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 15, temperature=0.0)
    uncached = generate(model, prompt, 15, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make(CASES["iiet_r3"])
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    a = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    greedy = generate(model, prompt, 10, temperature=0.0)
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_p=1e-6), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(300)}
    assert draws == {0, 1}
    # top_p = 0.7: tokens 0 (0.5) and 1 (0.3) are needed to reach 0.7; token 2 is never drawn.
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert draws == {0, 1}


def test_generation_stops_rows_at_eos():
    model = make(CASES["euler"])
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(6))
    first = generate(model, prompt, 1, temperature=0.0)[:, -1]
    eos = int(first[0])  # row 0 emits this token at once; pretend it is <eos>
    out = generate(model, prompt, 8, temperature=0.0, eos_id=eos)
    assert (out[0, 3:] == eos).all()


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = make(CASES["euler"])
    with pytest.raises(UserInputError, match="sequence of 41 tokens is longer than max_seq_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    cache = model.init_cache(1, 40)
    model(torch.zeros(1, 39, dtype=torch.long), cache, 0)
    with pytest.raises(UserInputError, match="max_seq_len=40"):
        model(torch.zeros(1, 2, dtype=torch.long), cache, 39)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 50, "n_heads": 4}, "d_model=50"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3"),
        ({"n_layers": 0}, "n_layers=0"),
    ],
)
def test_bad_shapes(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        DecoderConfig(**kwargs)


def test_scheme_parameters_and_evaluation_counts():
    """Same parameters for euler and iiet (so checkpoints transfer); extra ones only where the scheme has them."""
    n = {name: sum(p.numel() for p in make(ode).parameters()) for name, ode in CASES.items()}
    assert n["euler"] == n["iiet_r3"] == n["looped_schedule"] == n["rk2"] == n["rk4"]
    assert n["rk2_gated"] == n["euler"] + 3 * (2 * 48 + 1)
    assert n["pcformer"] > n["euler"]
    assert n["iiet_anderson"] == n["euler"] and n["iiet_relaxation"] == n["euler"] + 3  # one relaxation per layer
    evals = {name: make(ode).update.total_evals() for name, ode in CASES.items()}
    assert evals == {
        "euler": 3,
        "iiet_r3": 9,
        "iiet_schedule": 6,
        "iiet_sublayer": 6,
        "iiet_mean_damped": 9,
        "iiet_anderson": 9,
        "iiet_relaxation": 9,
        "looped_schedule": 6,
        "rk2": 6,
        "rk2_gated": 6,
        "rk4": 12,
        "pcformer": 9,
    }
