"""MMEALinear and ELoRALinear against the method's equations written out by hand (float64)."""
import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from mmea_kernels import ELoRALinear, MMEALinear

from helpers import IN, OUT, TOL, make_linear, naive_mmea, randomise


def check_identity_at_init(ad, lin, x):
    """A fresh adapter gives the base output: bit for bit on the unfused path (backend="torch": the
    base layer, then gates of exactly 1 and additive terms of 0), to round-off on the default path
    (on CPU the fused C++ linear, which sums the products in another order than e3nn's einsum)."""
    torch.testing.assert_close(ad(x), lin(x), **TOL[torch.float64])
    backend = ad.backend
    try:
        ad.backend = "torch"
        torch.testing.assert_close(ad(x), lin(x), rtol=0, atol=0)
    finally:
        ad.backend = backend


def _need_backend(backend):
    if backend == "cpp":
        from mmea_kernels.ops.gated_linear import cpp_status
        ok, why = cpp_status("cpu")
        if not ok:
            pytest.skip(why)


def mmea_by_hand(lin, ad, x, phi="exp"):
    """y' from DEVELOPERS.md: z = SiLU(W_down x0 + b_down), γ = W_up z + b_up (column by column)."""
    return naive_mmea(ad, lin(x), x, IN, OUT, phi=phi)


@pytest.mark.parametrize("phi", ["exp", "residual"])
def test_mmea_matches_equations(phi):
    lin = make_linear()
    ad = MMEALinear(lin, rank=5, phi=phi)
    assert ad.base is lin and ad.mmea_down.in_features == 5  # both 0e blocks feed the gate net
    assert ad.num_additive == 4 and ad.num_gates == 3 + 2 + 2 + 1
    x = torch.randn(6, o3.Irreps(IN).dim, dtype=torch.float64)
    check_identity_at_init(ad, lin, x)
    randomise(ad)
    torch.testing.assert_close(ad(x), mmea_by_hand(lin, ad, x, phi), rtol=1e-13, atol=1e-13)
    assert (ad(x) - lin(x)).abs().max() > 1e-2


def test_mmea_gradients_and_double_backward_against_hand_version():
    lin = make_linear()
    ad = MMEALinear(lin, rank=4)
    randomise(ad)
    x = torch.randn(5, o3.Irreps(IN).dim, dtype=torch.float64, requires_grad=True)
    params = [p for n, p in ad.named_parameters() if not n.startswith("base.")]

    def grads(fn):
        y = fn(x)
        (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), [x] + params)

    for a, b in zip(grads(ad), grads(lambda x: mmea_by_hand(lin, ad, x))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_mmea_leading_dims():
    lin = make_linear()
    ad = MMEALinear(lin)
    randomise(ad)
    x = torch.randn(2, 3, o3.Irreps(IN).dim, dtype=torch.float64)
    torch.testing.assert_close(ad(x), ad(x.reshape(6, -1)).reshape(2, 3, -1))


@pytest.mark.parametrize("cls", [MMEALinear, ELoRALinear])
def test_wrong_input_width_names_irreps(cls):
    ad = cls(make_linear())
    with pytest.raises(ValueError, match=r"input has shape \(3, 7\), but irreps_in 3x0e\+2x0e\+2x1o\+1x2e\+1x0o needs "
                                         r"the last dimension to be 17"):
        ad(torch.randn(3, 7, dtype=torch.float64))


@pytest.mark.parametrize("cls", [MMEALinear, ELoRALinear])
def test_equivariant_with_random_weights(cls):
    ad = cls(make_linear())
    randomise(ad)
    x = torch.randn(7, o3.Irreps(IN).dim, dtype=torch.float64)
    assert_equivariant(ad, args_in=[x], irreps_in=[o3.Irreps(IN)], irreps_out=[o3.Irreps(OUT)],
                       tolerance=1e-10)


def test_static_gates_when_input_has_no_scalar():
    lin = make_linear("2x1o+1x0o", "3x1o+1x2e+2x0e")
    ad = MMEALinear(lin)
    assert ad.mmea_down is None and ad.mmea_static.shape == (2 + 4,)
    x = torch.randn(4, lin.irreps_in.dim, dtype=torch.float64)
    check_identity_at_init(ad, lin, x)
    with torch.no_grad():
        ad.mmea_static.copy_(torch.tensor([0.5, -1.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    y, y0 = ad(x), lin(x)
    e = lambda v: torch.exp(torch.tensor(v, dtype=torch.float64))  # noqa: E731
    # columns: 3x1o -> 0..8, 1x2e -> 9..13, 2x0e -> 14, 15
    torch.testing.assert_close(y[:, 14:16], y0[:, 14:16] + torch.tensor([0.5, -1.0], dtype=torch.float64))
    torch.testing.assert_close(y[:, 0:3], y0[:, 0:3] * e(0.1))
    torch.testing.assert_close(y[:, 6:9], y0[:, 6:9] * e(0.3))
    torch.testing.assert_close(y[:, 9:14], y0[:, 9:14] * e(0.4))
    assert_equivariant(ad, args_in=[x], irreps_in=[lin.irreps_in], irreps_out=[lin.irreps_out], tolerance=1e-10)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_layers_without_output_or_input_columns(backend):
    """No output columns: an empty output (the torch path failed on reshape(-1, 0)). No input columns
    (an o3.Linear from "" gives zeros): the static gates and additive terms alone, by hand."""
    _need_backend(backend)
    lin = make_linear("2x0e+1x1o", "")
    ad = MMEALinear(lin, backend=backend)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = ad(x)
    assert y.shape == (4, 0)
    (gx,) = torch.autograd.grad(y.sum(), x, allow_unused=True, materialize_grads=True)
    assert torch.equal(gx, torch.zeros_like(x))
    lin = o3.Linear("", "2x0e+1x1o").double()
    ad = MMEALinear(lin, backend=backend)
    static = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
    with torch.no_grad():
        ad.mmea_static.copy_(static)
    y = ad(torch.zeros(3, 0, dtype=torch.float64))
    torch.testing.assert_close(y, torch.cat([static[:2], torch.zeros(3, dtype=torch.float64)]).expand(3, 5),
                               rtol=0, atol=0)


@pytest.mark.parametrize("irreps_in,irreps_out,rows", [("2x0e+1x1o", "", 4), ("", "2x0e+1x1o", 3)])
def test_scripted_layers_without_columns_match_eager(irreps_in, irreps_out, rows):
    """The TorchScript form reshapes with rows2d too (reshape(-1, 0) failed there as well)."""
    ad = MMEALinear(o3.Linear(irreps_in, irreps_out).double(), backend="torch")
    randomise(ad)
    x = torch.randn(rows, ad.in_layout.dim, dtype=torch.float64)
    y = torch.jit.script(ad)(x)
    assert y.shape == (rows, ad.out_layout.dim)
    torch.testing.assert_close(y, ad(x), rtol=0, atol=0)


def test_adapter_on_a_base_without_parameters_follows_its_dtype():
    """An o3.Linear without paths has no parameters; the adapter took the default dtype (float32)
    under a float64 model and failed at the first call. Its floating buffers carry the dtype."""
    lin = o3.Linear("4x0e", "2x1o")
    assert not list(lin.parameters())
    lin = lin.double() if torch.get_default_dtype() != torch.float64 else lin.float()
    ad = MMEALinear(lin, rank=3)
    dtype = next(lin.buffers()).dtype
    assert {p.dtype for p in ad.adapter_parameters()} == {dtype}
    assert ad(torch.randn(5, 4, dtype=dtype)).dtype == dtype


def test_paper_init_random_additive_zero_gates():
    lin = make_linear()
    ad = MMEALinear(lin, init="paper", backend="torch")  # the unfused path: gated columns are lin(x) * 1.0
    n_add = ad.num_additive
    assert ad.mmea_up.weight[:n_add].abs().sum() > 0
    assert torch.all(ad.mmea_up.weight[n_add:] == 0) and torch.all(ad.mmea_up.bias[n_add:] == 0)
    bound = 1 / ad.rank ** 0.5
    assert ad.mmea_up.weight[:n_add].abs().max() <= bound
    ad2 = MMEALinear(make_linear(), init="paper", init_std=1e-3)
    assert 0 < ad2.mmea_up.weight[:n_add].std() < 1e-2
    x = torch.randn(3, lin.irreps_in.dim, dtype=torch.float64)
    gates_only = ad(x) - lin(x)
    assert gates_only[:, n_add:].abs().max() == 0  # gates start at exactly 1
    assert gates_only[:, :n_add].abs().max() > 0


def test_bad_options():
    lin = make_linear()
    with pytest.raises(ValueError, match="unknown phi 'tanh'"):
        MMEALinear(lin, phi="tanh")
    with pytest.raises(ValueError, match="unknown init 'zeros'"):
        MMEALinear(lin, init="zeros")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        MMEALinear(lin, rank=0)
    with pytest.raises(TypeError, match="adapters wrap e3nn o3.Linear layers; got torch.nn.modules.linear.Linear"):
        MMEALinear(torch.nn.Linear(3, 3))


# ----------------------------------------------------------------------------- ELoRA
def test_elora_matches_merged_linear_and_merges_exactly():
    lin = make_linear()
    ad = ELoRALinear(lin, rank=3, alpha=6.0)
    assert len(ad.elora_A) == len(lin.instructions)
    x = torch.randn(5, lin.irreps_in.dim, dtype=torch.float64)
    y0 = lin(x)
    torch.testing.assert_close(ad(x), y0, rtol=0, atol=0)  # B = 0 at start
    randomise(ad)
    # ΔW per instruction written out: W_i + (α/r) A_i B_i
    blocks, off = [], 0
    for ins, A, B in zip(lin.instructions, ad.elora_A, ad.elora_B):
        n = ins.path_shape[0] * ins.path_shape[1]
        blocks.append((lin.weight[off:off + n].reshape(ins.path_shape) + 2.0 * A @ B).reshape(-1))
        off += n
    ref = o3.Linear(lin.irreps_in, lin.irreps_out).double()
    with torch.no_grad():
        ref.weight.copy_(torch.cat(blocks))
        ref.bias.copy_(lin.bias)
    y = ad(x)
    torch.testing.assert_close(y, ref(x), **TOL[torch.float64])
    assert (y - y0).abs().max() > 1e-2
    merged = ad.merge()
    assert merged is lin
    torch.testing.assert_close(merged(x), y, **TOL[torch.float64])


def test_elora_parameter_count_per_instruction():
    lin = make_linear()
    ad = ELoRALinear(lin, rank=4)
    expect = sum(4 * (ins.path_shape[0] + ins.path_shape[1]) for ins in lin.instructions)
    assert sum(p.numel() for p in ad.adapter_parameters()) == expect


def check_fused_matches_unfused(backend, device):
    lin = make_linear()
    plain = MMEALinear(lin, rank=3, backend="torch")
    randomise(plain)
    fused = MMEALinear(make_linear().to(device), rank=3, backend=backend).to(device)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(5, o3.Irreps(IN).dim, dtype=torch.float64, requires_grad=True)
    xd = x.detach().to(device).requires_grad_()
    assert fused._fused(xd, (), {})[1] == backend and plain._fused(x, (), {}) is None

    def grads(ad, x):
        (gx,) = torch.autograd.grad((ad(x) ** 2).sum(), x, create_graph=True)
        params = [p for n, p in ad.named_parameters() if not n.startswith("base.")]
        return [ad(x)] + list(torch.autograd.grad((gx ** 2).sum(), [x] + params))

    for a, b in zip(grads(fused, xd), grads(plain, x)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-11)


def test_fused_triton_path_matches_unfused(device):
    """backend='triton' runs the fused linear+gate kernel (interpreter on CPU, CUDA where a GPU
    exists): same values, input, adapter and double-backward gradients as the unfused torch path
    on CPU."""
    check_fused_matches_unfused("triton", device)


def test_fused_cpp_path_is_the_cpu_default_and_matches_unfused(monkeypatch):
    """On CPU with the extension built, auto (and backend='cpp') runs the fused C++ linear+gate
    kernels for float32/float64: same values, gradients and second derivatives as the unfused path;
    other dtypes keep the unfused path."""
    from mmea_kernels.ops.gated_linear import cpp_status
    ok, why = cpp_status("cpu")
    if not ok:
        pytest.skip(why)
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    check_fused_matches_unfused("cpp", "cpu")
    ad = MMEALinear(make_linear(), rank=3)
    x = torch.randn(2, o3.Irreps(IN).dim, dtype=torch.float64)
    assert ad._fused(x, (), {})[1] == "cpp" and ad._fused(x.float(), (), {})[1] == "cpp"
    assert ad._fused(x.half(), (), {}) is None and ad._fused(x, (x,), {}) is None


def test_fused_linear_env_switch_keeps_the_unfused_path(monkeypatch):
    """MMEA_FUSED_LINEAR=0 (for comparing the paths on a device) keeps a layer that would fuse on the
    unfused path: no fused-linear kernel runs, and the output is the same."""
    from mmea_kernels.ops.gated_linear import cpp_status
    ok, why = cpp_status("cpu")
    if not ok:
        pytest.skip(why)
    ad = MMEALinear(make_linear(), rank=3, backend="cpp")
    randomise(ad)
    x = torch.randn(4, o3.Irreps(IN).dim, dtype=torch.float64)
    assert ad.fused_kernel(x) == "cpp"
    y_fused = ad(x)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    assert ad.fused_kernel(x) is None
    with torch.profiler.profile() as prof:
        y = ad(x)
    assert not any(e.name.startswith("mmea_kernels_ext::gated_linear") for e in prof.events())
    torch.testing.assert_close(y, y_fused, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "off")
    assert ad.fused_kernel(x) is None
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "True")
    assert ad.fused_kernel(x) == "cpp"
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "maybe")
    with pytest.raises(ValueError, match="MMEA_FUSED_LINEAR='maybe'"):
        ad(x)


def test_fused_plan_is_cached_but_follows_every_input_of_the_decision(monkeypatch):
    """The fused-or-not decision is made once per (device, dtype, backend setting, MMEA_* variables,
    installed kernels) and reused; changing any of them changes it on the next call."""
    from mmea_kernels.ops.backends import clear_backend_cache
    from mmea_kernels.ops.gated_linear import cpp_status
    ok, why = cpp_status("cpu")
    if not ok:
        pytest.skip(why)
    monkeypatch.delenv("MMEA_BACKEND", raising=False)
    monkeypatch.delenv("MMEA_FUSED_LINEAR", raising=False)
    ad = MMEALinear(make_linear(), rank=3)
    x = torch.randn(4, o3.Irreps(IN).dim, dtype=torch.float64)
    calls = []
    real = ad._eager_plan
    monkeypatch.setattr(ad, "_eager_plan", lambda t: calls.append(1) or real(t))
    assert ad.fused_kernel(x) == "cpp" and ad.fused_kernel(x) == "cpp" and len(calls) == 1
    assert ad.fused_kernel(x.half()) is None and len(calls) == 2  # another dtype: decided again
    monkeypatch.setenv("MMEA_BACKEND", "torch")
    assert ad.fused_kernel(x) is None
    monkeypatch.delenv("MMEA_BACKEND")
    ad.backend = "torch"
    assert ad.fused_kernel(x) is None
    ad.backend = None
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "0")
    assert ad.fused_kernel(x) is None
    monkeypatch.delenv("MMEA_FUSED_LINEAR")
    n = len(calls)
    assert ad.fused_kernel(x) == "cpp" and len(calls) == n + 1
    clear_backend_cache()  # what is installed may have changed: decided again
    assert ad.fused_kernel(x) == "cpp" and len(calls) == n + 2
    # a pickled (torch.save of a whole model) or copied layer does not carry this process's decisions
    import copy
    import io
    assert "_eager_plans" in ad.__dict__
    buf = io.BytesIO()
    monkeypatch.delattr(ad, "_eager_plan")  # the spy is not picklable
    torch.save(ad, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(ad)):
        assert "_eager_plans" not in other.__dict__
        torch.testing.assert_close(other(x), ad(x), rtol=0, atol=0)


def test_fused_path_with_operands_of_another_dtype_is_refused_by_name():
    """A base weight of another dtype than the input (a half-converted model) is refused by name
    (the layer's input check, before the fast call that skips gated_linear's checks)."""
    from mmea_kernels.ops.gated_linear import cpp_status
    ok, why = cpp_status("cpu")
    if not ok:
        pytest.skip(why)
    ad = MMEALinear(make_linear(), rank=3, backend="cpp")
    x = torch.randn(4, o3.Irreps(IN).dim)
    ad.base.float(), ad.mmea_down.double(), ad.mmea_up.double()  # gate net in float64, base linear in float32
    xd = x.double()
    assert ad.fused_kernel(xd) == "cpp"
    with pytest.raises(TypeError, match="input is torch.float64 but the layer's weights are torch.float32"):
        ad(xd)


@pytest.mark.parametrize("phi", ["exp", "residual"])
def test_fused_cpp_path_runs_the_gate_net_kernels(phi):
    """On the fused cpp path the gate net is one C++ op forward (gate_net_fwd) and one backward
    (gate_net_bwd, a backward that builds no graph): the layer equals the unfused torch path in
    values and in the input and adapter gradients."""
    from mmea_kernels.ops.gate_net import gate_net_cpp_status
    ok, why = gate_net_cpp_status(torch.zeros(1, 1))
    if not ok:
        pytest.skip(why)
    plain = MMEALinear(make_linear(), rank=3, phi=phi, backend="torch")
    randomise(plain)
    fused = MMEALinear(make_linear(), rank=3, phi=phi, backend="cpp")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(300, o3.Irreps(IN).dim, dtype=torch.float64, requires_grad=True)
    params = lambda ad: [x] + [p for n, p in ad.named_parameters() if not n.startswith("base.")]  # noqa: E731
    with torch.profiler.profile() as prof:
        y = fused(x)
        got = torch.autograd.grad((y * y.cos()).sum(), params(fused))
    names = {e.name for e in prof.events()}
    assert {"mmea_kernels_ext::gate_net_fwd", "mmea_kernels_ext::gate_net_bwd"} <= names
    y_ref = plain(x)
    want = torch.autograd.grad((y_ref * y_ref.cos()).sum(), params(plain))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("irreps_in,span", [(IN, (0, 5)), ("2x0e+1x1o+3x0e+1x0o", None), ("1x1o+2x0e", (3, 2))])
def test_gate_net_reads_scalar_columns(irreps_in, span):
    """The gate net reads the 0e input columns through a view when they are one contiguous range,
    else gathers them; either way the layer equals its equations, gradients included."""
    lin = make_linear(irreps_in)
    ad = MMEALinear(lin, rank=3, backend="torch")
    randomise(ad)
    assert ad._scalar_span == span
    x = torch.randn(4, o3.Irreps(irreps_in).dim, dtype=torch.float64, requires_grad=True)
    y, ref = ad(x), naive_mmea(ad, lin(x), x, irreps_in, OUT)
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0],
                               rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend,fused", [("triton", True), ("triton", False), ("cpp", False)])
def test_cuda_paths_never_synchronise_the_host(backend, fused, monkeypatch):
    """Once warm (kernels compiled, index tables on the device), an MMEALinear and a FusedGate on
    CUDA run forward, the create_graph backward and the double backward with no host-device sync:
    one sync per layer would stall the host until the device is idle in every MD step."""
    from mmea_kernels.nn import FusedGate
    from mmea_kernels.ops import backend_status
    ok, why = backend_status(backend, "cuda")
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("MMEA_FUSED_LINEAR", "1" if fused else "0")
    dev = torch.device("cuda")
    ad = MMEALinear(make_linear(), rank=3, backend=backend).to(dev, torch.float32)
    randomise(ad)
    x = torch.randn(64, o3.Irreps(IN).dim, device=dev, requires_grad=True)
    assert (ad.fused_kernel(x) is not None) == fused
    layers = [ad]
    if backend == "triton":
        layers.append(FusedGate("4x0e", [torch.nn.functional.silu], "3x0e", [torch.sigmoid], "2x1o+1x2e",
                                backend="triton").to(dev))
    inputs = [x, torch.randn(64, layers[-1].irreps_in.dim, device=dev, requires_grad=True)]

    def step():
        for layer, xi in zip(layers, inputs):
            params = [xi] + [p for p in layer.parameters() if p.requires_grad]
            with torch.no_grad():
                layer(xi)
            (gx,) = torch.autograd.grad((layer(xi) ** 2).sum(), xi, create_graph=True)
            torch.autograd.grad((gx ** 2).sum(), params, allow_unused=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
