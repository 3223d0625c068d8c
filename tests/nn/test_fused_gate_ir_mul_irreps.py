"""FusedGate(layout="ir_mul"): the reported irreps describe the columns. Every gated entry is its own
ir_mul block, so adjacent equal entries (``1x1o+1x1o``, or equal entries made adjacent by the sort)
are reported apart, not merged into ``2x1o`` (whose ir_mul columns are others); mul_ir is e3nn's."""
import pytest
import torch
import torch.nn.functional as F

e3nn = pytest.importorskip("e3nn")
from e3nn import o3  # noqa: E402
from e3nn.nn import Gate  # noqa: E402

from mmea_kernels.nn.fused_gate import FusedGate  # noqa: E402


def _to_ir_mul(x, irreps):
    """mul_ir -> ir_mul, block by block of ``irreps``."""
    out, off = [], 0
    for mul, ir in o3.Irreps(irreps):
        if mul == 0:
            continue
        out.append(x[:, off:off + mul * ir.dim].reshape(-1, mul, ir.dim).transpose(1, 2).reshape(-1, mul * ir.dim))
        off += mul * ir.dim
    return torch.cat(out, 1)


CASES = {
    "adjacent": ("1x0e", [F.silu], "2x0e", [torch.sigmoid], "1x1o+1x1o"),
    "adjacent_after_sort": ("1x0e", [F.silu], "3x0e", [torch.sigmoid], "1x1o+1x2e+1x1o"),
    "odd_gates": ("2x0e+1x0o", [F.silu, torch.tanh], "1x0o+2x0e", [torch.tanh, torch.sigmoid], "1x1o+1x1e+1x1e"),
    "wider": ("3x0e", [F.silu], "2x0e+3x0e", [torch.sigmoid, F.silu], "2x1o+3x1o+0x2e"),
}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("case", list(CASES))
def test_ir_mul_reported_irreps_describe_the_columns(case, backend):
    """e3nn's Gate, in ir_mul of the FusedGate's reported irreps_in / irreps_out, is what it computes."""
    args = CASES[case]
    ref = Gate(*args).double()
    fg = FusedGate(*args, layout="ir_mul", backend=backend)
    assert fg.irreps_in.dim == ref.irreps_in.dim and fg.irreps_out.dim == ref.irreps_out.dim
    x = torch.randn(5, ref.irreps_in.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = fg(_to_ir_mul(x, fg.irreps_in))
    torch.testing.assert_close(y, _to_ir_mul(ref(x), fg.irreps_out), rtol=1e-12, atol=1e-12)
    # the same parities as e3nn's (only the blocks are per entry)
    assert sorted(fg.irreps_out.simplify()) == sorted(ref.irreps_out.simplify())


def test_ir_mul_irreps_are_per_entry():
    fg = FusedGate(*CASES["adjacent_after_sort"], layout="ir_mul")
    assert str(fg.irreps_in) == "4x0e+1x1o+1x1o+1x2e"
    assert str(fg.irreps_out) == "1x0e+1x1o+1x2e+1x1o"
    assert str(fg.irreps_gated) == "1x1o+1x2e+1x1o"


@pytest.mark.parametrize("case", list(CASES))
def test_mul_ir_irreps_unchanged_e3nn(case):
    ref = Gate(*CASES[case])
    fg = FusedGate(*CASES[case])
    for attr in ("irreps_in", "irreps_out", "irreps_scalars", "irreps_gates", "irreps_gated"):
        assert getattr(fg, attr) == getattr(ref, attr), attr


def test_ir_mul_refuses_an_entry_with_gates_of_both_parities():
    """One 2x1o block whose copies get an even and an odd gate has no ir_mul irreps: refused, with the fix."""
    args = ("1x0e", [F.silu], "1x0e+1x0o", [torch.sigmoid, torch.tanh], "2x1o")
    with pytest.raises(ValueError, match=r"2x1o gets gates of both parities.*1x1o\+1x1o"):
        FusedGate(*args, layout="ir_mul")
    fg = FusedGate("1x0e", [F.silu], "1x0e+1x0o", [torch.sigmoid, torch.tanh], "1x1o+1x1o", layout="ir_mul")
    assert str(fg.irreps_out) == "1x0e+1x1o+1x1e"
    assert FusedGate(*args).irreps_out == Gate(*args).irreps_out  # mul_ir: e3nn's


@pytest.mark.parametrize("text", ["2x0y+1x1y", "1x2y+3x3y", "0y", "4x1y+2x0o+1x2e"])
def test_irreps_string_with_y_parity_reads_as_e3nn(text):
    """e3nn's 'y' parity letter: (-1)^l (0y = 0e, 1y = 1o, ...)."""
    from mmea_kernels import IrrepsLayout, gate_mul
    from mmea_kernels.layout import parse_irreps

    ref = o3.Irreps(text)
    assert parse_irreps(text) == tuple((mul, ir.l, ir.p) for mul, ir in ref)
    assert IrrepsLayout.of(text) == IrrepsLayout.of(ref)
    lay = IrrepsLayout.of(ref)
    x, g = torch.randn(2, lay.dim), torch.randn(2, lay.num_gates)
    torch.testing.assert_close(gate_mul(x, g, text, backend="torch"), gate_mul(x, g, ref, backend="torch"))
