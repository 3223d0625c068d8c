"""IrrepsLayout against column maps written from the definition."""
import pytest
from e3nn import o3

from mmea_kernels.layout import IrrepsLayout, parse_irreps
from mmea_kernels.ops import layout_tables

from helpers import naive_gate_of_column

CASES = [
    "128x0e+128x1o",
    "128x0e+128x0e+128x1o",
    "3x0e+0x1o+1x2e+5x3o",
    "2x0o+1x1e+3x1o+2x0e+1x1o",
    "1x0e",
    "4x1o",
    "0x0e",
    "",
]


@pytest.mark.parametrize("irreps", CASES)
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_gate_of_column_matches_definition(irreps, layout):
    L = IrrepsLayout.of(irreps, layout)
    owner, G = naive_gate_of_column(irreps, layout)
    assert list(L.gate_of_column) == owner
    assert L.num_gates == G
    assert L.dim == len(owner)
    assert list(L.scalar_columns) == [c for c, g in enumerate(owner) if g < 0]
    # gate_columns lists exactly the columns of each gate
    for g, cols in enumerate(L.gate_columns):
        assert sorted(cols) == [c for c, o in enumerate(owner) if o == g]
    assert L.gate_ptr[-1] == sum(1 for o in owner if o >= 0)


def test_pseudoscalars_are_gated_not_additive():
    L = IrrepsLayout.of("2x0e+3x0o", "mul_ir")
    assert L.scalar_columns == (0, 1)
    assert L.gate_of_column == (-1, -1, 0, 1, 2)
    assert L.gate_orders == ((0, -1),) * 3


def test_accepts_e3nn_cue_strings_and_pairs():
    a = IrrepsLayout.of(o3.Irreps("128x0e+128x0e+128x1o"))  # unsimplified stays unsimplified
    b = IrrepsLayout.of("128x0e+128x0e+128x1o")
    c = IrrepsLayout.of([(128, (0, 1)), (128, "0e"), (128, o3.Irrep("1o"))])
    assert a is b is c  # cached per (irreps, layout)
    assert len(a.blocks) == 3
    cue = pytest.importorskip("cuequivariance")
    d = IrrepsLayout.of(cue.Irreps("O3", "128x0e+128x0e+128x1o"), "ir_mul")
    assert d.irreps_str == a.irreps_str and d.layout == "ir_mul"


def test_tables_cached_per_device_and_layout():
    L = IrrepsLayout.of("2x0e+2x1o", "mul_ir")
    t1 = layout_tables(L, "cpu")
    assert layout_tables(L, "cpu") is t1
    t2 = layout_tables(IrrepsLayout.of("2x0e+2x1o", "ir_mul"), "cpu")
    assert t2 is not t1
    assert t1.gate_cols_padded.shape == (2, 4)
    assert t1.gate_cols_padded[0].tolist() == [2, 3, 4, -1]
    assert t2.gate_cols_padded[0].tolist() == [2, 4, 6, -1]


@pytest.mark.parametrize("bad, msg", [
    ("128x0e+12x1q", "cannot parse term '12x1q'"),
    ("x1o", "cannot parse"),
])
def test_bad_irreps_strings(bad, msg):
    with pytest.raises(ValueError, match=msg):
        IrrepsLayout.of(bad)


def test_bad_layout_and_type():
    with pytest.raises(ValueError, match="unknown layout 'xyz'"):
        IrrepsLayout.of("1x0e", "xyz")
    with pytest.raises(TypeError, match="irreps must be"):
        IrrepsLayout.of(3.5)


def test_repr_names_the_gate_and_scalar_counts():
    """2x0e: two additive scalar columns; 1x1o + 3x2e: 1 + 3 gates (one per copy of each l >= 1 irrep)."""
    text = repr(IrrepsLayout("2x0e+1x1o+3x2e", "mul_ir"))
    assert "dim=20" in text and "num_gates=4" in text and "num_scalars=2" in text, text
