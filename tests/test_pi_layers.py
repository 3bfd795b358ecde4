"""π-layers, kernel, π-SGD, finite twin and feature kernel against independent references (spec §1.14)."""

import copy
import io
import math

import numpy as np
import pytest
import torch

from manynets.cuda_ops.pi_kernel import pi_backward, pi_forward, pi_forward_reference, row_chunks
from manynets.layers.feature_kernel import pi_kernel, ridge_predict
from manynets.layers.pi import DEFAULT_BLOCK_ROWS, InfPiLayer, PiLinearFunction, estimate_memory, state_shapes_only
from manynets.layers.pi_math import ab_norm, j1, phi, phi_prime, relu_covariance
from manynets.layers.pi_optim import PiSGD, clip_gradients
from manynets.networks import PiMLP


def pimlp(d_in, d_out, **kwargs):
    """A π-MLP on d_in-dimensional inputs (image shape (1, 1, d_in))."""
    return PiMLP(d_out, (1, 1, d_in), **kwargs)


def pi_layers(net):
    """The infinite layers (hidden and readout)."""
    return net.layers()[1:]


def pisgd(net, lr, wd=0.0):
    params = [p for p in net.parameters() if p.requires_grad]
    if net.infinite:
        params += [layer.Amult for layer in pi_layers(net)]
    return PiSGD(params, lr=lr, weight_decay=wd)


# -- closed forms ----------------------------------------------------------------------
def test_phi_j1_closed_forms():
    c = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    assert phi(c)[0].item() == pytest.approx(0.5, abs=1e-9)
    assert phi(c)[1].item() == pytest.approx(1 / (2 * math.pi), abs=1e-12)
    assert phi(c)[2].item() == pytest.approx(0.0, abs=1e-9)
    assert j1(c)[0].item() == pytest.approx(1.0, abs=1e-9)


def test_phi_is_relu_expectation_and_phi_prime_its_derivative():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 400_000))
    for cval in (-0.7, 0.0, 0.3, 0.9):
        z2 = cval * z[0] + math.sqrt(1 - cval**2) * z[1]
        mc = np.mean(np.maximum(z[0], 0) * np.maximum(z2, 0))
        assert phi(torch.tensor(cval, dtype=torch.float64)).item() == pytest.approx(mc, abs=4e-3)
    c = torch.linspace(-0.95, 0.95, 21, dtype=torch.float64)
    h = 1e-6
    numeric = (phi(c + h) - phi(c - h)) / (2 * h)
    assert torch.allclose(phi_prime(c), numeric, atol=1e-8)
    assert torch.allclose(phi_prime(c), torch.acos(-c) / (2 * math.pi))


def test_ab_norm_matches_monte_carlo_and_single_row():
    torch.manual_seed(0)
    dA, dB = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    u = torch.randn(400_000, 4, dtype=torch.float64) @ dB.T  # u ~ N(0, dB dB^T)
    v_mc = (torch.relu(u).T @ torch.relu(u)) / u.shape[0]
    assert torch.allclose(relu_covariance(dB), v_mc, rtol=0.03, atol=0.02)
    expected = torch.sqrt(((dA @ dA.T) * v_mc).sum())
    assert ab_norm(dA, dB).item() == pytest.approx(expected.item(), rel=0.02)
    b = torch.randn(1, 4, dtype=torch.float64)
    a = torch.randn(1, 5, dtype=torch.float64)
    assert ab_norm(a, b / b.norm()).item() == pytest.approx(a.norm().item() / math.sqrt(2), rel=1e-8)


# -- kernel ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_kernel_equals_reference(chunk):
    torch.manual_seed(0)
    b, r, r_out, m = 5, 6, 3, 157
    g = torch.randn(b, r, dtype=torch.float64)
    s = g.norm(dim=1)
    gbar = (g / s[:, None]).requires_grad_()
    B = torch.randn(m, r, dtype=torch.float64)
    B = B / B.norm(dim=1, keepdim=True)
    A, Amult = torch.randn(m, r_out, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    ref = pi_forward_reference(gbar, s, A, B, Amult)
    assert torch.allclose(pi_forward(gbar.detach(), s, A, B, Amult, chunk), ref, atol=1e-12)
    # backward w.r.t. g = s gbar: autograd of the reference with s and gbar recomputed from g
    gg = g.clone().requires_grad_()
    norm = gg.norm(dim=1)
    delta = torch.randn(b, r_out, dtype=torch.float64)
    (pi_forward_reference(gg / norm[:, None], norm, A, B, Amult) * delta).sum().backward()
    assert torch.allclose(pi_backward(delta, gbar.detach(), A, B, Amult, chunk), gg.grad, atol=1e-10)


def test_kernel_custom_ops_schema_and_fake():
    """The ops torch.compile sees: registered schema, fake (meta) implementations, same values as eager."""
    from manynets.cuda_ops.pi_kernel import pi_backward_op, pi_forward_op

    torch.manual_seed(0)
    g, B, A, delta = torch.randn(3, 4), torch.randn(20, 4), torch.randn(20, 2), torch.randn(3, 2)
    B, s = B / B.norm(dim=1, keepdim=True), g.norm(dim=1)
    gbar, Amult = g / s[:, None], torch.rand(20)
    checks = ("test_schema", "test_faketensor")
    blocks = [list(A.split(9)), list(B.split(9)), [Amult]]  # the state as lists of row blocks
    torch.library.opcheck(pi_forward_op, (gbar, s, *blocks, 7), test_utils=checks)
    torch.library.opcheck(pi_backward_op, (delta, gbar, *blocks, 7), test_utils=checks)
    assert torch.equal(pi_forward_op(gbar, s, *blocks, 7), pi_forward(gbar, s, A, B, Amult, 7))
    assert torch.equal(pi_backward_op(delta, gbar, *blocks, 7), pi_backward(delta, gbar, A, B, Amult, 7))


def test_kernel_low_precision_state_close_to_fp32():
    torch.manual_seed(0)
    g, B, A = torch.randn(4, 8), torch.randn(300, 8), torch.randn(300, 5)
    B = B / B.norm(dim=1, keepdim=True)
    Amult, s = torch.rand(300), g.norm(dim=1)
    gbar = g / s[:, None]
    ref = pi_forward(gbar, s, A, B, Amult, 50)
    for dt in (torch.float16, torch.bfloat16):
        out = pi_forward(gbar, s, A.to(dt), B.to(dt), Amult, 50)
        assert out.dtype == torch.float32
        assert torch.allclose(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("layernorm", [False, True])
def test_custom_backward_gradcheck_and_rows(layernorm):
    torch.manual_seed(0)
    b, r, r_out, m = 3, 4, 2, 9
    B = torch.randn(m, r, dtype=torch.float64)
    B = B / B.norm(dim=1, keepdim=True)
    A, Amult = torch.randn(m, r_out, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    g = torch.randn(b, r, dtype=torch.float64, requires_grad=True)
    pa = torch.zeros(b, r_out, dtype=torch.float64)
    pb = torch.zeros(b, r, dtype=torch.float64)

    def f(x):
        return PiLinearFunction.apply(x, pa, pb, A, B, Amult, layernorm, 4)

    assert torch.autograd.gradcheck(f, (g,), eps=1e-6, atol=1e-7)
    # against autograd of the forward formula written out directly
    x = g.detach().clone().requires_grad_()
    norm = x.norm(dim=1, keepdim=True)
    s = torch.ones_like(norm) if layernorm else norm
    q = (x / norm) @ B.T
    direct = ((torch.sqrt(1 - q**2) + q * (math.pi - torch.acos(q))) / (2 * math.pi) * s * Amult) @ A
    delta = torch.randn(b, r_out, dtype=torch.float64)
    (direct * delta).sum().backward()
    pa2, pb2 = pa.clone().requires_grad_(), pb.clone().requires_grad_()
    out = PiLinearFunction.apply(g, pa2, pb2, A, B, Amult, layernorm, 4)
    assert torch.allclose(out, direct.detach(), atol=1e-12)
    (out * delta).sum().backward()
    assert torch.allclose(g.grad, x.grad, atol=1e-10)
    assert torch.allclose(pa2.grad, delta * s)  # A-rows = delta * s
    assert torch.allclose(pb2.grad, x.detach() / norm)  # B-rows = gbar


# -- π-net state and π-SGD -------------------------------------------------------------
def test_output_zero_at_init_and_rows_grow_old_rows_fixed():
    torch.manual_seed(0)
    net = pimlp(6, 3, r=5, depth=3, bias_alpha=0.5, seed=0)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    assert net(x).abs().max().item() == 0.0
    before = {id(l): tuple(l.state_tensor(n) for n in ("A", "B", "Amult")) for l in pi_layers(net)}
    lr, wd, b, t = 0.3, 0.01, 4, 6
    opt = pisgd(net, lr, wd)
    for step in range(t):
        loss = torch.nn.functional.cross_entropy(net(x[step * 3 : step * 3 + b]), y[step * 3 : step * 3 + b])
        loss.backward()
        opt.step()
        opt.zero_grad()
    for layer in pi_layers(net):
        A0, B0, M0 = before[id(layer)]
        A, B = layer.state_tensor("A"), layer.state_tensor("B")
        assert layer.num_rows == 5 + b * t == B.shape[0] == layer.Amult.shape[0]
        assert torch.equal(A[:5], A0) and torch.equal(B[:5], B0)
        decay = (1 - lr * wd) ** t
        assert torch.allclose(layer.Amult[:5], M0 * decay, rtol=1e-6)
        # rows appended at step k carry -lr decayed by the later steps
        expected = torch.tensor([-lr * (1 - lr * wd) ** (t - 1 - k) for k in range(t)]).repeat_interleave(b)
        assert torch.allclose(layer.Amult[5:], expected, rtol=1e-6)
        assert torch.allclose(B[5:].norm(dim=1), torch.ones(b * t), atol=1e-5)
    assert net(x).abs().max().item() > 0


def test_estimate_memory_matches_state_after_training():
    net = pimlp(7, 3, r=4, depth=2, state_dtype="float16", seed=0)
    opt = pisgd(net, 0.1)
    for _ in range(5):
        net(torch.randn(6, 7)).sum().backward()
        opt.step()
    est = estimate_memory(7, 3, 4, 2, 6, 5, "float16")
    assert est["rows"] == net.head.num_rows == 34
    assert est["state"] == net.state_bytes()  # A, B (fp16), Amult (fp32), biases and the input layer
    assert est["peak"] > est["state"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("blocks", [(DEFAULT_BLOCK_ROWS, DEFAULT_BLOCK_ROWS), (5, 3)], ids=["default", "5to3"])
def test_save_load_reproduces_outputs_exactly(dtype, blocks):
    """Save -> load with the same or another block size; A, B, Amult saved as single tensors of exactly M rows."""
    torch.manual_seed(0)
    net = pimlp(5, 2, r=3, depth=2, state_dtype=dtype, block_size=blocks[0], seed=1)
    opt = pisgd(net, 0.5, 1e-3)
    for _ in range(7):  # grows past the over-allocation boundary of Amult and across blocks
        net(torch.randn(3, 5)).square().sum().backward()
        opt.step()
    x = torch.randn(11, 5)
    with torch.no_grad():
        out = net.eval()(x)
    state = net.state_dict()
    for name, width in (("A", 2), ("B", 3), ("Amult", None)):
        saved = state[f"head.{name}"]
        assert saved.shape == ((24, width) if width else (24,))
        assert saved.untyped_storage().nbytes() == saved.nbytes  # no over-allocated storage in the file
    with state_shapes_only(net):
        shapes = net.state_dict()
    assert shapes["head.A"].is_meta and shapes["head.A"].shape == state["head.A"].shape
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = pimlp(5, 2, r=3, depth=2, state_dtype=dtype, block_size=blocks[1], seed=2)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.head.num_rows == net.head.num_rows == 3 + 21
    assert len(fresh.head.state_blocks("B")) == -(-24 // blocks[1])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out)
    for name in ("A", "B", "Amult"):
        assert torch.equal(fresh.head.state_tensor(name), net.head.state_tensor(name))
    assert net.head.state_tensor("A").dtype == getattr(torch, dtype) and net.head.Amult.dtype == torch.float32
    with pytest.raises(RuntimeError, match="size mismatch for head.A"):
        pimlp(5, 4, r=3, depth=2).load_state_dict(state)


# -- blocked state -------------------------------------------------------------------------
def _train(net, steps, batch, seed=0):
    """``steps`` π-SGD steps (clipped, with weight decay) on random data; returns the net."""
    gen = torch.Generator().manual_seed(seed)
    opt = pisgd(net, 0.3, 1e-2)
    for _ in range(steps):
        x, y = torch.randn(batch, net.d_in, generator=gen), torch.randint(0, net.num_classes, (batch,), generator=gen)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        clip_gradients(net, 0.4, per_param=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net


def test_growth_appends_blocks_without_copies():
    """Every block stays where it is as the state grows; storage is whole blocks, at most one beyond M rows."""
    layer = (net := pimlp(6, 3, r=4, depth=2, block_size=10, seed=0)).head
    seen = []
    for step in range(8):
        _train(net, 1, 5, seed=step)
        blocks = [layer.state_blocks(n) for n in ("A", "B")]
        ptrs = [[b.data_ptr() for b in bs] for bs in blocks]
        assert all(now[: len(before)] == before for now, before in zip(ptrs, seen))
        seen, m = ptrs, 4 + 5 * (step + 1)
        assert [len(b) for b in blocks[0]] == [10] * (m // 10) + ([m % 10] if m % 10 else [])
        assert sum(b.untyped_storage().nbytes() for bs in blocks for b in bs) == -(-m // 10) * 10 * (3 + 4) * 4
    assert len(seen[0]) == 5


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_blocked_state_equals_one_block(dtype):
    """Training is bit-identical for any block size: the state is the one-block (contiguous) state cut in blocks."""
    nets = {size: _train(pimlp(6, 3, r=4, depth=3, chunk_size=7, block_size=size, state_dtype=dtype,
                               readout_zero_init=False, seed=0), 9, 5) for size in (3, 10, 10_000)}  # fmt: skip
    ref, x = nets[10_000], torch.randn(8, 6)
    assert len(ref.head.state_blocks("A")) == 1
    for size, net in nets.items():
        for layer, ref_layer in zip(pi_layers(net), pi_layers(ref)):
            assert layer.num_rows == 49 and len(layer.state_blocks("A")) == -(-49 // size)
            for name in ("A", "B", "Amult"):
                assert torch.equal(layer.state_tensor(name), ref_layer.state_tensor(name))
        with torch.no_grad():
            assert torch.equal(net.eval()(x), ref.eval()(x))


def test_row_chunks_across_block_borders_are_exact():
    torch.manual_seed(0)
    A, B, Amult = torch.randn(23, 3), torch.randn(23, 4), torch.rand(23)
    B = B / B.norm(dim=1, keepdim=True)
    blocks = [list(A.split(5)), list(B.split(14)), [Amult[:1], Amult[1:1], Amult[1:]]]  # borders off the chunk grid
    chunks = list(row_chunks(7, *blocks))
    assert [len(c[0]) for c in chunks] == [7, 7, 7, 2]
    for k, chunk in enumerate(chunks):
        assert all(torch.equal(part, whole[7 * k : 7 * k + 7]) for part, whole in zip(chunk, (A, B, Amult)))
    assert chunks[0][1].data_ptr() == blocks[1][0].data_ptr()  # inside one block: a view, no copy
    g, delta = torch.randn(3, 4), torch.randn(3, 3)
    s = g.norm(dim=1)
    gbar = g / s[:, None]
    assert torch.equal(pi_forward(gbar, s, *blocks, 7), pi_forward(gbar, s, A, B, Amult, 7))
    assert torch.equal(pi_backward(delta, gbar, *blocks, 7), pi_backward(delta, gbar, A, B, Amult, 7))
    with pytest.raises(ValueError, match="different numbers of rows"):
        list(row_chunks(7, A, B[:5]))


def test_blocks_follow_dtype_device_moves_and_copies():
    net = _train(pimlp(5, 2, r=3, depth=2, block_size=4, readout_zero_init=False, seed=0), 3, 3)
    x = torch.randn(4, 5)
    with torch.no_grad():
        out = net.eval()(x)
        twin = copy.deepcopy(net).double()
        assert {b.dtype for b in twin.head.state_blocks("A") + twin.head.state_blocks("B")} == {torch.float64}
        assert net.head.state_tensor("A").dtype == torch.float32  # the copy owns its blocks
        assert torch.allclose(twin(x.double()), out.double(), atol=1e-6)
    _train(twin.float().train(), 1, 3)  # back in fp32; the copy's Amult leads PiSGD to the copy
    assert twin.head.num_rows == net.head.num_rows + 3 == 15


def test_clipping_per_param_and_global():
    torch.manual_seed(0)
    net = pimlp(4, 2, r=3, depth=2, readout_zero_init=False, seed=0)
    net(torch.randn(5, 4)).square().sum().mul(100).backward()
    rows = {id(l): l.pi_grads()[0].clone() for l in pi_layers(net)}
    norms = {id(l): ab_norm(*l.pi_grads()).item() for l in pi_layers(net)}
    a1 = net.stem[1].A1.grad.clone()
    total = clip_gradients(net, 0.01, per_param=True)
    others = [p.grad for p in net.parameters() if p.grad is not None]
    assert total.item() > 0.01
    for l in pi_layers(net):
        assert ab_norm(*l.pi_grads()).item() == pytest.approx(min(norms[id(l)], 0.01), rel=1e-3)
        assert torch.allclose(l.pi_grads()[0], rows[id(l)] * min(1, 0.01 / (norms[id(l)] + 1e-6)))
    assert net.stem[1].A1.grad.norm().item() == pytest.approx(min(a1.norm().item(), 0.01), rel=1e-3)
    assert all(g.norm().item() <= 0.0101 for g in others)
    net.zero_grad()
    for l in pi_layers(net):
        l.zero_pi_grads()
    net(torch.randn(5, 4)).square().sum().mul(100).backward()
    before = clip_gradients(net, 0.0)  # measure only
    after = clip_gradients(net, 0.05)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    assert clip_gradients(net, 0.0).item() == pytest.approx(0.05, rel=1e-3)


# -- the PiMLP backbone against the formulas in float64 --------------------------------
A1_ALPHA, OUT_ALPHA, BETA, OUT_BETA = 0.7, 0.5, 0.5, 2.0


def direct_forward(net, x):
    """Spec §1.3 (infinite) / §1.7 (finite) written out in float64 from the net's state."""
    d = lambda t: t.detach().double()  # noqa: E731
    x, layers = x.flatten(1).double(), net.layers()
    alphas = [A1_ALPHA] + [1.0] * (len(layers) - 2) + [OUT_ALPHA]
    betas = [BETA] * (len(layers) - 1) + [OUT_BETA]
    if net.infinite:
        g = A1_ALPHA * (x @ d(layers[0].A1) + BETA * d(layers[0].bias))
        for layer, alpha, beta in zip(layers[1:], alphas[1:], betas[1:]):
            s = g.norm(dim=1, keepdim=True)
            c = ((g / s) @ d(layer.state_tensor("B")).T).clamp(-1, 1)
            phi = (torch.sqrt(1 - c**2) + c * (math.pi - torch.acos(c))) / (2 * math.pi)
            g = alpha * ((phi * s * d(layer.Amult)) @ d(layer.state_tensor("A")) + beta * d(layer.bias))
        return g
    h = x
    for l, (lin, alpha, beta) in enumerate(zip(layers, alphas, betas)):
        h = alpha * ((torch.relu(h) if l else h) @ d(lin.linear.weight).T + beta * d(lin.bias))
    return h


@pytest.mark.parametrize("width", [0, 64], ids=["infinite", "finite"])
def test_pimlp_forward_is_the_formula(width):
    torch.manual_seed(0)
    net = pimlp(12, 3, r=5, depth=3, width=width, readout_zero_init=False, first_layer_alpha=A1_ALPHA,
                last_layer_alpha=OUT_ALPHA, bias_alpha=BETA, last_bias_alpha=OUT_BETA, chunk_size=7, seed=0)  # fmt: skip
    opt = pisgd(net, 0.3, 1e-2)
    for _ in range(3):  # grow the state (infinite) / move the weights (finite) away from the init
        torch.nn.functional.cross_entropy(net(torch.randn(6, 12)), torch.randint(0, 3, (6,))).backward()
        net.project_gradients()
        opt.step()
        opt.zero_grad()
    assert not width or net.layers()[1].linear.weight.shape == (64, 64)
    x = torch.randn(9, 12)
    with torch.no_grad():
        out = net(x)
    expected = direct_forward(net, x)
    assert expected.abs().max() > 1e-3
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-6)


def test_finite_pimlp_has_named_linear_layers_at_the_seams():
    """Saturation and probes hook ordinary Linear layers (their outputs are the preactivations h_l)."""
    fin = pimlp(12, 3, r=5, depth=3, width=16, seed=0)
    linears = {n: m for n, m in fin.named_modules() if isinstance(m, torch.nn.Linear)}
    assert list(linears) == ["stem.1.linear", "body.1.linear", "body.3.linear", "head.1.linear"]
    assert fin.stem_channels == fin.feature_dim == 16 and fin.features(torch.randn(2, 12)).shape == (2, 16)
    inf = pimlp(12, 3, r=5, depth=3, seed=0)
    assert inf.stem_channels == inf.feature_dim == 5 and inf.stem(torch.randn(2, 12)).shape == (2, 5)


# -- finite twin -----------------------------------------------------------------------
def test_finite_twin_init_coefficients_converge():
    """sqrt(n) (Omega^T Omega)^-1 Omega^T h_l -> g_l with error ~ n^-1/2 (spec §1.14 item 2)."""
    inf = pimlp(4, 2, r=3, depth=3, seed=0)
    x = torch.randn(10, 4)
    g = [inf.stem(x)]
    for layer in inf.body:
        g.append(layer(g[-1]))
    errors = []
    for n in (250, 4000):
        per_seed = []
        for seed in (3, 4, 5):  # average over Omega draws: one draw's Monte Carlo error fluctuates
            fin = pimlp(4, 2, r=3, depth=3, width=n, seed=seed).sample_from(inf)
            hs = [fin.stem(x)]  # preactivations h_1..h_L
            for act, lin in zip(fin.body[::2], fin.body[1::2]):
                hs.append(lin(act(hs[-1])))
            assert fin(x).abs().max().item() == 0.0  # readout A = 0 -> both outputs 0
            err = []
            for l in range(3):
                omega = fin.layers()[l].omega
                coef = math.sqrt(n) * torch.linalg.lstsq(omega, hs[l].T).solution.T
                err.append(((coef - g[l]).norm() / g[l].norm()).item())
            assert err[0] < 1e-4  # the input layer is exact
            per_seed.append(err[1] + err[2])
        errors.append(float(np.mean(per_seed)))
    assert errors[1] < errors[0] / 2.5  # ~ n^-1/2: a factor 4 expected for 16x the width


def _loss_curve(net, X, Y, lr, bs, steps, order):
    opt = pisgd(net, lr)
    losses = []
    for t in range(steps):
        idx = order[torch.arange(t * bs, (t + 1) * bs) % len(order)]
        loss = 0.5 * (net(X[idx]) - Y[idx]).square().sum(1).mean()
        loss.backward()
        net.project_gradients()  # finite twin: onto span(Omega); infinite: no-op
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.slow
def test_finite_twin_follows_infinite_net_on_sine():
    """Spec §1.14 item 1 on a reduced grid: median relative loss-curve difference < 5 % at n = 1000, smaller than at 250."""
    x = torch.linspace(-math.pi, math.pi, 100)
    X, Y = torch.stack([x, torch.ones_like(x)], 1), torch.sin(x)[:, None]
    diffs = {250: [], 1000: []}
    for seed in (0, 1):
        for bs, lr in ((4, 0.1), (32, 0.05)):
            order = torch.randperm(100, generator=torch.Generator().manual_seed(seed))
            inf = pimlp(2, 1, r=2, depth=2, seed=10 + seed)
            fins = {n: pimlp(2, 1, r=2, depth=2, width=n, seed=seed).sample_from(inf) for n in diffs}
            li = _loss_curve(inf, X, Y, lr, bs, 100, order)
            for n, fin in fins.items():
                lf = _loss_curve(fin, X, Y, lr, bs, 100, order)
                diffs[n].append(((lf - li).norm() / li.norm()).item())
    med = {n: float(np.median(d)) for n, d in diffs.items()}
    assert med[1000] < 0.05, med
    assert med[1000] < med[250], med


def test_gaussian_init_and_projection():
    fin = pimlp(4, 3, r=2, depth=2, width=64, seed=0)
    fin(torch.randn(5, 4)).square().sum().backward()
    w = fin.layers()[1].linear.weight.grad.clone()
    fin.project_gradients()
    omega = fin.layers()[1].omega
    P = omega @ torch.linalg.pinv(omega)
    assert torch.allclose(fin.layers()[1].linear.weight.grad, P @ w, atol=1e-5)
    mu = pimlp(4, 3, r=2, depth=2, width=2000, gaussian_init=True, gproj=False, seed=0)
    assert mu.layers()[1].linear.weight.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.02)


# -- feature kernel -------------------------------------------------------------------
def test_ridge_and_pi_kernel():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((30, 5))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    K = pi_kernel(torch.tensor(f), torch.tensor(f))
    assert torch.allclose(torch.diagonal(K), torch.full((30,), 0.5, dtype=torch.float64), atol=1e-9)
    labels = rng.integers(0, 3, 30)
    Kn = K.numpy()
    y = np.eye(3)[labels] - 0.5
    alpha = np.linalg.solve(Kn[:20, :20] + 1e-3 * np.eye(20), y[:20])
    expected = (Kn[20:, :20] @ alpha).argmax(1)
    got = ridge_predict(K[:20, :20], torch.tensor(labels[:20]), K[20:, :20], 1e-3, 3)
    assert np.array_equal(got.numpy(), expected)
    with pytest.raises(ValueError, match="reg"):
        ridge_predict(K[:20, :20], torch.tensor(labels[:20]), K[20:, :20], -1.0, 3)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="state_dtype"):
        InfPiLayer(3, 3, state_dtype="float64")
    with pytest.raises(ValueError, match="block_size"):
        pimlp(3, 2, r=2, block_size=0)
    with pytest.raises(ValueError, match="depth"):
        pimlp(3, 2, r=2, depth=0)
    layer = InfPiLayer(3, 2)
    with pytest.raises(ValueError, match=r"expects input \(batch, 3\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="Amult of an InfPiLayer"):
        PiSGD([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])
