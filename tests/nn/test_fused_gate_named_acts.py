"""Activations of other packages that FusedGate recognises by where they are defined, without
importing the package: NequIP's shifted softplus (``nequip.nn.nonlinearities.shifted_softplus``,
and its module ``ShiftedSoftplus``), which a NequIP review (2026-12-03) found running the plain
path. Recognised only when its values agree with the kernel's function; a look-alike of the same name
runs its own code. (NequIP is not a test dependency: the functions below are defined as NequIP 0.19
defines them, under its module name.)"""
import math

import pytest
import torch
import torch.nn.functional as F
from e3nn.nn import Gate

from mmea_kernels.nn.fused_gate import FusedGate


def _named(fn, module="nequip.nn.nonlinearities", name="shifted_softplus"):
    fn.__module__, fn.__name__, fn.__qualname__ = module, name, name
    return fn


def nequip_ssp(x):
    return F.softplus(x) - math.log(2.0)


class ShiftedSoftplus(torch.nn.Module):
    def forward(self, x):
        return nequip_ssp(x)


ShiftedSoftplus.__module__ = "nequip.nn.nonlinearities"


def look_alike(x):
    return F.softplus(x) - 0.5


@pytest.mark.parametrize("act, fused", [(_named(nequip_ssp), True), (ShiftedSoftplus(), True),
                                        (_named(look_alike), False)])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_nequip_shifted_softplus_is_fused_and_equals_e3nns_gate(act, fused, backend):
    from mmea_kernels.ops.fused_gate import fused_gate_backend_status

    if backend == "cpp" and not fused_gate_backend_status("cpp", torch.device("cpu"))[0]:
        pytest.skip("C++ extension not built")
    args = ("4x0e", [act], "3x0e", [act], "2x1o+1x2e")
    ref = Gate(*args).double()
    fg = FusedGate(*args, backend=backend)
    assert fg.fused == fused
    x = torch.randn(7, ref.irreps_in.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 4
    x.requires_grad_(True)
    y, want = fg(x), ref(x)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    v = torch.randn_like(want)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    (g_ref,) = torch.autograd.grad(want, x, v, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    (gg,) = torch.autograd.grad((g * g).sum(), x)  # second derivatives, as force training takes them
    (gg_ref,) = torch.autograd.grad((g_ref * g_ref).sum(), x)
    torch.testing.assert_close(gg, gg_ref, rtol=1e-10, atol=1e-10)
