"""torch.func transforms and other tracers around the package's layers (a review, 2026-12-03).
Inside ``torch.compile`` the layers ran their ``torch.library`` custom ops, which have no
forward-mode formula: ``torch.func.jvp`` came back with a zero tangent (no warning) and ``jacrev``
raised; ``make_fx`` fake tracing of ``MMEALinear`` / ``MMEATensorProduct`` reached an extension op
with no fake kernel; a refused backend came back as dynamo's InternalTorchDynamoError. References:
central finite differences, the eager transform (tested against e3nn in test_forward_mode.py) and
the eager layer."""
import pytest
import torch
import torch.nn.functional as F
from e3nn import o3
from torch.fx.experimental.proxy_tensor import make_fx

from mmea_kernels import MMEALinear, gate_mul
from mmea_kernels.nn import FusedGate
from mmea_kernels.nn.mmea import MMEATensorProduct
from mmea_kernels.ops.gate import cpp as cpp_backend

EXT_OK, EXT_WHY = cpp_backend.available(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not EXT_OK, reason=f"cpp backend unavailable: {EXT_WHY}")
D = torch.float64
L = "2x0e+2x1o"


def _layers():
    torch.manual_seed(0)
    g = torch.rand(3, 2, dtype=D) + 0.5
    lin = MMEALinear(o3.Linear(L, L).to(D), rank=2, backend="cpp")
    with torch.no_grad():
        for p in lin.adapter_parameters():
            p.normal_(0, 0.5)
    gate = FusedGate("2x0e", [F.silu], "2x0e", [torch.sigmoid], "1x1o+1x0e", backend="cpp").to(D)
    return {"gate_mul": lambda x: gate_mul(x, g, L, backend="cpp"), "MMEALinear": lin, "FusedGate": gate}


@pytest.mark.parametrize("name", ["gate_mul", "MMEALinear", "FusedGate"])
def test_jvp_and_jacrev_inside_torch_compile(name):
    f = _layers()[name]
    torch.manual_seed(1)
    x = torch.randn(3, 8, dtype=D)
    v = torch.randn_like(x)
    torch._dynamo.reset()
    tangent = torch.compile(lambda x, v: torch.func.jvp(f, (x,), (v,))[1], backend="eager")(x, v)
    fd = (f(x + 1e-6 * v) - f(x - 1e-6 * v)) / 2e-6
    assert fd.abs().max() > 0.1  # a tangent that is there to be lost
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-7)

    def energy(x):
        return f(x).sin().sum()

    torch._dynamo.reset()
    jac = torch.compile(lambda x: torch.func.jacrev(energy)(x), backend="eager")(x)
    torch.testing.assert_close(jac, torch.func.jacrev(energy)(x), rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
    hvp = torch.compile(lambda x: torch.func.jvp(torch.func.grad(energy), (x,), (v,))[1], backend="eager")(x)
    torch.testing.assert_close(hvp, torch.func.jvp(torch.func.grad(energy), (x,), (v,))[1], rtol=1e-12, atol=1e-12)


def test_fake_tracing_of_adapted_layers_on_the_default_backend():
    torch.manual_seed(0)
    lin = MMEALinear(o3.Linear("5x0e+2x1o", "4x0e+2x1o").to(D), rank=2)  # auto: the C++ kernels on CPU
    tp = MMEATensorProduct(o3.FullyConnectedTensorProduct("3x0e+1x1o", "1x0e+1x1o", "2x0e+2x1o").to(D), rank=2)
    with torch.no_grad():
        for m in (lin, tp):
            for n, p in m.named_parameters():
                if "mmea" in n:
                    p.normal_(0, 0.5)
    x = torch.randn(6, 11, dtype=D)
    x1, x2 = torch.randn(5, 6, dtype=D), torch.randn(5, 4, dtype=D)
    for m, args in ((lin, (x,)), (tp, (x1, x2))):
        params = {k: t.detach() for k, t in [*m.named_parameters(), *m.named_buffers()]}

        def f(params, *a):
            return torch.func.functional_call(m, params, a)

        for mode in ("fake", "symbolic"):
            graph = make_fx(f, tracing_mode=mode)(params, *args)
            torch.testing.assert_close(graph(params, *args), m(*args), rtol=1e-12, atol=1e-12)


def test_a_refused_backend_under_compile_is_the_eager_error(monkeypatch):
    from mmea_kernels.ops.backends import clear_backend_cache

    lin = o3.Linear("5x0e+2x1o", "4x0e+2x1o").to(D)
    x = torch.randn(6, 11, dtype=D)
    monkeypatch.setenv("MMEA_BACKEND", "bogus")
    clear_backend_cache()
    try:
        torch._dynamo.reset()
        with pytest.raises(ValueError, match="unknown backend 'bogus'"):
            torch.compile(MMEALinear(lin, rank=2), backend="eager")(x)
    finally:
        monkeypatch.delenv("MMEA_BACKEND")
        clear_backend_cache()


def test_fused_gate_width_error_under_fullgraph_names_the_irreps():
    g = FusedGate("4x0e", [F.silu], "2x0e", [torch.sigmoid], "2x1o").to(D)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"the dimension of irreps_in = 6x0e\+2x1o"):
        torch.compile(g, backend="eager", fullgraph=True)(torch.randn(3, 11, dtype=D))


def test_dual_tensors_into_a_function_compiled_without_them():
    """The forward-AD level is a guard of the compiled code: a function compiled for plain tensors
    and then called with dual tensors recompiles instead of running the custom op, which returned
    no tangent at all (None)."""
    from torch.autograd import forward_ad as fwAD

    f = _layers()["gate_mul"]
    torch.manual_seed(2)
    x = torch.randn(3, 8, dtype=D)
    v = torch.randn_like(x)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(compiled(fwAD.make_dual(x, v))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, (f(x + 1e-6 * v) - f(x - 1e-6 * v)) / 2e-6, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_vmap_over_the_backward_of_a_fused_gate(backend):
    """mace-torch's Hessians vmap ``autograd.grad`` over an eager graph; autograd's ``vectorize=True``
    does the same with its own vmap. Both raised once the torch reference filled its buffers in place
    (a review of this session's diff, 2026-12-03). Reference: one ``autograd.grad`` per row."""
    gate = FusedGate("2x0e", [F.silu], "2x0e", [torch.sigmoid], "1x1o+1x0e", backend=backend).to(D)
    torch.manual_seed(3)
    x = torch.randn(3, 8, dtype=D, requires_grad=True)
    (f,) = torch.autograd.grad(gate(x).sin().sum(), x, create_graph=True)
    f = f.reshape(-1)
    eye = torch.eye(f.numel(), dtype=D)
    want = torch.stack([torch.autograd.grad(f, x, e, retain_graph=True)[0] for e in eye])
    got = torch.vmap(lambda v: torch.autograd.grad(f, x, v, retain_graph=True)[0])(eye)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    jac = torch.autograd.functional.jacobian(gate, x.detach(), vectorize=True)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(gate, x.detach()), rtol=1e-12, atol=1e-12)
