"""The schemes against known answers: a linear ODE's exact solution, orders of accuracy, implicit Euler."""

import math
from typing import get_args

import pytest
import torch
from torch import nn

from lit_iiet.analysis.convergence import ConvergenceMeter
from lit_iiet.errors import UserInputError
from lit_iiet.nn.decoder import Decoder, DecoderConfig
from lit_iiet.nn.ode import SCHEMES, Branch, ODEConfig, SchemeName, anderson, fixed_point

DIM = 4


@pytest.fixture(autouse=True)
def float64():
    """The maths is checked in float64, so tolerances can be tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def linear_system(seed: int = 0) -> torch.Tensor:
    """A stable, non-normal A (eigenvalues with negative real parts), so dy/dt = A y has y(t) = expm(tA) y0."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    return (M - M.T) - 0.5 * torch.eye(DIM, dtype=torch.float64) + 0.1 * M


def linear_branch(A: torch.Tensor, h: float) -> Branch:
    """G(z) = h A z: one layer is one step of size h."""
    return Branch([lambda z, e: z @ (h * A).T])


def one_layer(scheme: str, iters=1, **ode):
    """The scheme of a one-layer stack of width DIM; one_layer(...)(0, y, G) is its step."""
    return SCHEMES[scheme](ODEConfig(scheme, iters, **ode), 1, DIM)


def one_step(scheme: str, y: torch.Tensor, G, iters=1, **ode) -> torch.Tensor:
    return one_layer(scheme, iters, **ode)(0, y, G)


SCHEME_STEPS = {
    "euler": lambda y, G: one_step("euler", y, G),
    "rk2": lambda y, G: one_step("rk2", y, G),
    "rk2_gated": lambda y, G: one_step("rk2_gated", y, G),  # its gate starts at g = 1/2: Heun's RK2
    "rk4": lambda y, G: one_step("rk4", y, G),
    "iiet_converged": lambda y, G: one_step("iiet", y, G, 60),
}
ORDERS = {"euler": 1, "rk2": 2, "rk2_gated": 2, "rk4": 4, "iiet_converged": 1}


def integrate(step, A: torch.Tensor, n: int, t: float = 1.0) -> torch.Tensor:
    y = torch.ones(1, DIM, dtype=torch.float64)
    G = linear_branch(A, t / n)
    for _ in range(n):
        y = step(y, G)
    return y


@pytest.mark.parametrize("name", list(SCHEME_STEPS))
def test_order_of_accuracy_on_linear_ode(name):
    """Global error against expm(A) shrinks like h^p for the scheme's order p."""
    A = linear_system()
    exact = torch.ones(1, DIM, dtype=torch.float64) @ torch.linalg.matrix_exp(A).T
    errors = [(integrate(SCHEME_STEPS[name], A, n) - exact).norm().item() for n in (16, 32, 64)]
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < errors[0]
    for p in observed:
        assert abs(p - ORDERS[name]) < 0.2, (name, errors, observed)


def test_rk4_single_step_matches_taylor_polynomial():
    """One classic RK4 step on a linear system is exactly the degree-4 Taylor polynomial of expm(hA)."""
    A, h = linear_system(1), 0.3
    y = torch.randn(1, DIM, dtype=torch.float64)
    hA = h * A
    taylor = sum(torch.linalg.matrix_power(hA, k) / math.factorial(k) for k in range(5))
    assert torch.allclose(one_step("rk4", y, linear_branch(A, h)), y @ taylor.T, atol=1e-13)


def test_iiet_converges_to_implicit_euler_step():
    """Enough fixed-point iterations solve y_next = y + hA y_next, i.e. y_next = (I - hA)^-1 y."""
    A, h = linear_system(2), 0.1
    y = torch.randn(3, DIM, dtype=torch.float64)
    implicit = torch.linalg.solve(torch.eye(DIM, dtype=torch.float64) - h * A, y.T).T
    assert torch.allclose(one_step("iiet", y, linear_branch(A, h), 80), implicit, atol=1e-12)
    # r = 1 is explicit Euler, and the r-th Picard iterate is the Neumann series truncated after (hA)^r.
    G = linear_branch(A, h)
    assert torch.equal(one_step("iiet", y, G, 1), one_step("euler", y, G))
    neumann = sum(torch.linalg.matrix_power(h * A, k) for k in range(4))
    assert torch.allclose(one_step("iiet", y, G, 3), y @ neumann.T, atol=1e-14)


def test_damped_iteration_has_the_same_fixed_point():
    A, h = linear_system(3), 0.1
    y = torch.randn(2, DIM, dtype=torch.float64)
    implicit = torch.linalg.solve(torch.eye(DIM, dtype=torch.float64) - h * A, y.T).T
    assert torch.allclose(one_step("iiet", y, linear_branch(A, h), 200, iiet={"damping": 0.5}), implicit, atol=1e-12)
    # One damped iteration is a shortened explicit step: y + b G(y).
    G = linear_branch(A, h)
    assert torch.allclose(one_step("iiet", y, G, 1, iiet={"damping": 0.5}), y + 0.5 * G(y, 0), atol=1e-15)


def test_learned_relaxation_keeps_the_fixed_point_and_learns():
    """A relaxation parameter b (any value in (0, 1]) leaves the implicit Euler solution unchanged; it gets a gradient."""
    A, h = linear_system(3), 0.1
    y = torch.randn(2, DIM, dtype=torch.float64)
    implicit = torch.linalg.solve(torch.eye(DIM, dtype=torch.float64) - h * A, y.T).T
    b = torch.tensor(0.6, requires_grad=True)
    assert torch.allclose(fixed_point(y, linear_branch(A, h), 200, damping=b), implicit, atol=1e-12)
    fixed_point(y, linear_branch(A, h), 3, damping=b).sum().backward()
    assert b.grad is not None and b.grad != 0


def test_anderson_solves_a_linear_implicit_step_where_picard_diverges():
    """On a linear G, Anderson with memory >= d + 1 is GMRES in disguise: d + 1 evaluations give (I - hA)^-1 y
    exactly, here with h = 0.5 where hA has spectral radius 2 and the plain fixed-point iteration blows up."""
    A, h = linear_system(2), 0.5
    assert torch.linalg.eigvals(h * A).abs().max() > 1.5
    y = torch.randn(3, DIM, dtype=torch.float64)
    G = linear_branch(A, h)
    implicit = torch.linalg.solve(torch.eye(DIM, dtype=torch.float64) - h * A, y.T).T
    pure = anderson(y, G, DIM + 2, memory=DIM + 1, reg=0.0, max_step=float("inf"))
    assert torch.allclose(pure, implicit, atol=1e-9)
    # The default Tikhonov term and step cap cost accuracy here, but the iteration still converges.
    assert (anderson(y, G, 3 * DIM, memory=DIM + 1) - implicit).norm() < 1e-3 * implicit.norm()
    assert (fixed_point(y, G, DIM + 2) - implicit).norm() > 10 * implicit.norm()
    # One evaluation is the explicit Euler step, as for Picard.
    assert torch.equal(anderson(y, G, 1), one_step("euler", y, G))


def test_anderson_reaches_a_residual_in_fewer_evaluations_than_picard():
    """A contraction with Lipschitz constant 0.9 (nonlinear): Picard needs far more evaluations for the same residual."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)

    def G(z, e):
        return torch.tanh(z @ W.T)

    y = torch.randn(5, DIM, generator=g, dtype=torch.float64)
    residual = lambda z: ((z - y - G(z, 0)).norm() / z.norm()).item()  # noqa: E731
    solvers = {
        "picard": lambda r: fixed_point(y, G, r),
        "anderson m=3": lambda r: anderson(y, G, r, memory=3),
        "anderson m=5": lambda r: anderson(y, G, r, memory=5),
    }
    needed = {name: next(r for r in range(1, 200) if residual(solve(r)) < 1e-6) for name, solve in solvers.items()}
    assert needed["anderson m=3"] < needed["picard"] and needed["anderson m=5"] * 2 < needed["picard"], needed


def test_anderson_step_is_capped_by_the_last_residual():
    """The safeguard: no token moves further from its last evaluation than that evaluation's residual."""
    A, h = linear_system(2), 0.5
    y = torch.randn(6, DIM, dtype=torch.float64)
    G = linear_branch(A, h)
    iterates, evaluations = [], []
    anderson(y, lambda z, e: evaluations.append(z + 0) or G(z, e), 4, memory=3, iterates=iterates, max_step=0.5)
    for k in range(1, 4):  # z_(k+1) against g_k = y + G(z_k), the k-th evaluation's output
        g = y + G(evaluations[k], 0)
        assert ((iterates[k] - g).norm(dim=-1) <= 0.5 * (g - evaluations[k]).norm(dim=-1) * (1 + 1e-12)).all()
    capped = anderson(y, G, 4, memory=3, max_step=0.5)
    assert not torch.allclose(capped, anderson(y, G, 4, memory=3, max_step=float("inf")))


def test_anderson_mixes_each_token_on_its_own():
    """Rows of z are tokens: changing one token must not move another's iterate (the solver stays causal)."""
    W = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.4

    def G(z, e):
        return torch.tanh(z @ W.T)

    y = torch.randn(1, 6, DIM, dtype=torch.float64)
    other = y.clone()
    other[0, 4:] += 1.0
    a, b = anderson(y, G, 4), anderson(other, G, 4)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-15) and not torch.allclose(a[0, 4:], b[0, 4:])


def test_convergence_meter_on_a_scalar_linear_map():
    """G(z) = a z gives z_k = (1 + a + ... + a^k) y: increment k is |a|^k / |1 + ... + a^(k-1)| and each
    contraction estimate is |a|. A masked token (another a) must not count."""
    a = torch.tensor([-0.5, 0.9]).view(1, 2, 1)  # token 0 and a padding token
    update = one_layer("iiet", 3)
    meter = ConvergenceMeter()
    with update.trace(observe=meter.observer(update.schedule, mask=torch.tensor([[True, False]]))):
        update(0, torch.randn(1, 2, DIM, dtype=torch.float64), Branch([lambda z, e: a * z]))
    partial = [1.0, 0.5, 0.75]  # 1, 1 + a, 1 + a + a^2 for a = -0.5
    assert meter.tokens == 1
    assert meter.increments() == [pytest.approx([0.5**k / partial[k - 1] for k in (1, 2, 3)])]
    assert meter.contraction() == [pytest.approx([0.5, 0.5])]
    metrics = meter.metrics()
    assert metrics["iiet/contraction/0"] == pytest.approx(0.5) and metrics["iiet/increment/0/3"] == pytest.approx(
        0.125 / 0.75
    )


def test_mean_output_with_two_iterations_is_heun():
    """output="mean" averages the slopes G(z_0), G(z_1); with r = 2 that is exactly RK2 (Heun)."""
    A = linear_system(4)
    y = torch.randn(2, DIM, dtype=torch.float64)
    G = linear_branch(A, 0.2)
    assert torch.allclose(one_step("iiet", y, G, 2, iiet={"output": "mean"}), one_step("rk2", y, G), atol=1e-15)


def test_sublayer_unit_solves_each_sublayer_implicitly():
    """unit="sublayer": u = (I - hA1)^-1 y, then y_next = (I - hA2)^-1 u."""
    A1, A2, h = linear_system(5), linear_system(6), 0.1
    G = Branch([lambda z, e: z @ (h * A1).T, lambda z, e: z @ (h * A2).T])
    y = torch.randn(2, DIM, dtype=torch.float64)
    eye = torch.eye(DIM, dtype=torch.float64)
    u = torch.linalg.solve(eye - h * A1, y.T).T
    expected = torch.linalg.solve(eye - h * A2, u.T).T
    assert torch.allclose(one_step("iiet", y, G, 80, iiet={"unit": "sublayer"}), expected, atol=1e-12)


def test_fixed_point_residual_shrinks_with_r_for_contractive_G():
    """For a contraction with Lipschitz constant L, the residual ||z_r - y - G(z_r)|| falls at least by L per step."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    L = 0.6
    W = L * W / torch.linalg.matrix_norm(W, ord=2)  # tanh is 1-Lipschitz, so G is L-Lipschitz

    def G(z, e):
        return torch.tanh(z @ W.T)

    y = torch.randn(5, DIM, generator=g, dtype=torch.float64)
    residuals = []
    for r in range(1, 9):
        z = fixed_point(y, G, r)
        residuals.append((z - y - G(z, 0)).norm().item())
    for before, after in zip(residuals, residuals[1:]):
        assert after <= L * before + 1e-15
    assert residuals[-1] < 1e-2 * residuals[0]


def test_pcformer_predictor_and_corrector_closed_form():
    """PCformer's update on a linear G, written out by hand with identity norms."""
    A, h, alpha = linear_system(8), 0.1, torch.tensor(0.3, dtype=torch.float64)
    G = linear_branch(A, h)
    y = torch.randn(2, DIM, dtype=torch.float64)
    hA = (h * A).T  # row vectors: z @ hA == G(z)
    f1 = y @ hA
    f2 = (y + f1) @ hA
    expected_p = y + alpha * (1 - alpha) * f1 + alpha * f2
    pcformer = one_layer("pcformer")  # its one layer mixes [embedding, this layer]
    pcformer.alpha = nn.Parameter(alpha)
    pcformer.w_in, pcformer.w_out = nn.Parameter(torch.tensor([[0.25, 0.75]])), nn.Parameter(torch.tensor([[0.4, 0.6]]))
    pcformer.norm_p, pcformer.norm_h = nn.ModuleList([nn.Identity()]), nn.ModuleList([nn.Identity()])
    prediction = pcformer.predict(y, G)
    assert torch.allclose(prediction, expected_p, atol=1e-15)

    emb = torch.randn(2, DIM, dtype=torch.float64)
    history = [emb]
    out = pcformer.correct(0, history, prediction, G)
    c = 0.25 * emb + 0.75 * expected_p
    h_corr = c + c @ hA
    assert torch.allclose(out, 0.4 * emb + 0.6 * h_corr, atol=1e-15)
    assert len(history) == 2 and torch.allclose(history[-1], h_corr)


def tiny_decoder(scheme: str, iters=1, **ode) -> Decoder:
    cfg = DecoderConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, max_seq_len=32)
    torch.manual_seed(0)
    return Decoder(cfg, ODEConfig(scheme=scheme, iters=iters, **ode)).eval()


@pytest.mark.parametrize("iiet", [{}, {"output": "mean"}, {"solver": "anderson"}, {"relaxation": "learned"}])
def test_iiet_r1_equals_euler_on_the_same_weights(iiet):
    """Iteration 1 of the implicit Euler solve is the vanilla layer: same weights, identical logits (a learned
    relaxation starts at b = 1)."""
    vanilla = tiny_decoder("euler")
    model = tiny_decoder("iiet", 1, iiet=iiet)
    model.load_state_dict(vanilla.state_dict(), strict=not iiet.get("relaxation"))
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx), vanilla(idx))
    # More iterations change the output (so the comparison above can fail).
    deeper = tiny_decoder("iiet", 2)
    deeper.load_state_dict(vanilla.state_dict())
    assert not torch.allclose(deeper(idx), vanilla(idx))


def test_looped_is_r_explicit_euler_steps_with_the_same_weights():
    """On G(z) = hA z, r looped steps give (I + hA)^r y; IIET's r iterations give sum_k (hA)^k y instead."""
    A, h, r = linear_system(3), 0.2, 4
    y = torch.randn(3, DIM, dtype=torch.float64)
    G = linear_branch(A, h)
    step = torch.eye(DIM, dtype=torch.float64) + h * A
    assert torch.allclose(one_step("looped", y, G, r), y @ torch.linalg.matrix_power(step, r).T, atol=1e-13)
    neumann = sum(torch.linalg.matrix_power(h * A, k) for k in range(r + 1))
    assert torch.allclose(one_step("iiet", y, G, r), y @ neumann.T, atol=1e-13)


def test_looped_r1_equals_euler_and_r2_differs_from_iiet():
    vanilla = tiny_decoder("euler")
    models = {
        name: tiny_decoder(scheme, r)
        for name, (scheme, r) in {"l1": ("looped", 1), "l2": ("looped", 2), "i2": ("iiet", 2)}.items()
    }
    idx = torch.randint(0, 64, (2, 16))
    for model in models.values():
        model.load_state_dict(vanilla.state_dict())
    assert torch.equal(models["l1"](idx), vanilla(idx))
    assert not torch.allclose(models["l2"](idx), models["i2"](idx))


def test_iiet_sublayer_unit_r1_equals_euler():
    vanilla, model = tiny_decoder("euler"), tiny_decoder("iiet", 1, iiet={"unit": "sublayer"})
    model.load_state_dict(vanilla.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    assert torch.allclose(model(idx), vanilla(idx), atol=1e-12)


def test_branch_scale_is_a_step_size_of_every_scheme():
    """G scaled by s on G(z) = hA z: IIET converges to (I - s hA)^-1 y and euler is y + s hA y."""
    A, h, s = linear_system(4), 0.3, 0.4
    y = torch.randn(3, DIM, dtype=torch.float64)
    eye = torch.eye(DIM, dtype=torch.float64)
    implicit = torch.linalg.solve(eye - s * h * A, y.T).T
    update = one_layer("iiet", 80, branch_scale=s)
    assert torch.allclose(update(0, y, linear_branch(A, h)), implicit, atol=1e-12)
    explicit = one_layer("euler", branch_scale=s)
    assert torch.allclose(explicit(0, y, linear_branch(A, h)), y @ (eye + s * h * A).T, atol=1e-14)


def test_branch_scale_1_is_the_plain_layer_at_initialisation_and_learns():
    vanilla, scaled = tiny_decoder("iiet", 3), tiny_decoder("iiet", 3, branch_scale=1.0)
    scaled.load_state_dict(vanilla.state_dict(), strict=False)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(scaled(idx), vanilla(idx))
    small = tiny_decoder("iiet", 3, branch_scale=0.1)
    small.load_state_dict(vanilla.state_dict(), strict=False)
    assert not torch.allclose(small(idx), vanilla(idx))
    small(idx).sum().backward()
    assert small.update.branch_scale.grad.abs().sum() > 0


def test_shared_dropout_mask_is_one_mask_per_layer_step():
    """dropout_mask 'layer': every evaluation of a step sees the same output masks (so G(z, 0) == G(z, 1) for the
    same z, and the iteration solves one fixed-point problem); 'evaluation' draws new masks. r = 1 draws the same
    masks either way."""
    cfg = DecoderConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=4, max_seq_len=32, dropout=0.3)
    z = torch.randn(2, 8, 32, dtype=torch.float64)
    cos, sin = Decoder(cfg, ODEConfig("euler")).rope_cos[:8], Decoder(cfg, ODEConfig("euler")).rope_sin[:8]
    outputs = {}
    for mode in ("layer", "evaluation"):
        torch.manual_seed(0)
        block = Decoder(cfg, ODEConfig("iiet", 2, dropout_mask=mode)).blocks[0].train()
        block.attn.dropout = 0.0  # attention-weight dropout draws per evaluation in both modes
        G = block.branch(cos, sin, None, 0)
        outputs[mode] = (G(z, 0), G(z, 1))
    assert torch.equal(*outputs["layer"])
    assert not torch.allclose(*outputs["evaluation"])
    assert torch.equal(outputs["layer"][0], outputs["evaluation"][0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "midpoint"}, "unknown scheme 'midpoint'"),
        ({"branch_scale": 0.0}, "branch_scale=0.0 must be a number > 0"),
        ({"dropout_mask": "token"}, "unknown dropout_mask 'token'"),
        ({"scheme": "iiet", "iters": 0}, "iters=0"),
        ({"scheme": "iiet", "iters": [2, 0, 1]}, "iters=[2, 0, 1]"),
        ({"scheme": "rk2", "iters": 3}, "only used by schemes 'iiet' and 'looped'"),
        ({"scheme": "iiet", "iiet": {"damping": 0.0}}, "iiet.damping=0.0"),
        ({"scheme": "iiet", "iiet": {"output": "first"}}, "unknown iiet.output 'first'"),
        ({"scheme": "iiet", "iiet": {"unit": "head"}}, "unknown iiet.unit 'head'"),
        ({"scheme": "iiet", "iiet": {"solver": "newton"}}, "unknown iiet.solver 'newton'"),
        ({"scheme": "iiet", "iiet": {"anderson_memory": 1}}, "iiet.anderson_memory=1"),
        ({"scheme": "iiet", "iiet": {"solver": "anderson", "output": "mean"}}, "iiet.solver='anderson' mixes its own"),
        ({"scheme": "iiet", "iiet": {"relaxation": "adaptive"}}, "unknown iiet.relaxation 'adaptive'"),
        ({"scheme": "iiet", "iiet": {"policy": "residual", "solver": "anderson"}}, "iiet.solver 'picard'"),
        ({"scheme": "rk2", "iiet": {"damping": 0.5}}, "iiet.damping=0.5 is only used by scheme 'iiet'"),
    ],
)
def test_bad_ode_config(kwargs, message):
    with pytest.raises(UserInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ODEConfig(**kwargs)


def test_every_scheme_name_has_its_module():
    assert list(SCHEMES) == list(get_args(SchemeName))


def test_schedule_length_must_match_layers():
    with pytest.raises(UserInputError, match=r"schedule \[1, 2\] has 2 entries; the stack has 3 layers"):
        tiny_decoder("iiet", [1, 2])


def test_embed_scale_multiplies_the_stream_entering_the_stack():
    """embed_scale s on weights W is the same function as scale 1 on weights s W (untied head)."""
    cfg = DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=32)
    torch.manual_seed(0)
    scaled = Decoder(DecoderConfig(**{**cfg.__dict__, "embed_scale": 16.0}), ODEConfig("iiet", 3)).eval()
    plain = Decoder(cfg, ODEConfig("iiet", 3)).eval()
    state = scaled.state_dict()
    plain.load_state_dict({**state, "embed.weight": 16.0 * state["embed.weight"]})
    idx = torch.randint(0, 64, (2, 12))
    assert torch.allclose(scaled(idx), plain(idx), atol=1e-12)
    plain.load_state_dict(state)  # the same weights without the scale: another function
    assert not torch.allclose(scaled(idx), plain(idx), atol=1e-3)
    with pytest.raises(UserInputError, match="embed_scale=0.0 must be a number > 0 or 'sqrt_d_model'"):
        DecoderConfig(embed_scale=0.0)
    assert DecoderConfig(d_model=256, embed_scale="sqrt_d_model").embed_scale == 16.0
