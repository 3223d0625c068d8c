"""What adapters need to know about the frozen linear layer they wrap.

Two kinds of layer are supported:

* e3nn ``o3.Linear`` (``mul_ir`` features, flat weight ``[weight_numel]``, one block per instruction);
* cuEquivariance ``cuequivariance_torch.Linear`` (``cuet.Linear``): features in its input/output
  layout (``mul_ir`` or ``ir_mul``, read from its ``transpose_in.source`` / ``transpose_out.target``),
  weight ``[weight_classes, weight_numel]``, one block per path of the descriptor
  ``cue.descriptors.linear(irreps_in, irreps_out)`` (``weights[uv], input[iu], output[iv]``).

Both have the same block structure: for every pair (input block ``i_in``, output block ``i_out``)
of equal irreps, in input-major order, a row-major ``[mul_in, mul_out]`` block of the flat weight,
scaled by the path weight ``1/sqrt(Σ mul_in over the paths into i_out)``.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Tuple

import torch
from torch import nn

from ..layout import IrrepsLayout

__all__ = ["AdapterLinear", "WeightPath", "is_equivariant_linear", "is_cuet_linear", "linear_irreps",
           "linear_layouts", "linear_paths"]


def _cuet_linear_class():
    """``cuequivariance_torch.Linear`` when cuequivariance_torch has been imported (an instance can
    exist only then), else None. Never imports it."""
    mod = sys.modules.get("cuequivariance_torch")
    return getattr(mod, "Linear", None) if mod is not None else None


def is_cuet_linear(module) -> bool:
    """True for a ``cuequivariance_torch.Linear``."""
    cls = _cuet_linear_class()
    return cls is not None and isinstance(module, cls)


def _is_e3nn_linear(module) -> bool:
    try:
        from e3nn import o3
    except ImportError:  # pragma: no cover - e3nn is a hard requirement
        return False
    return isinstance(module, o3.Linear)


def is_equivariant_linear(module: nn.Module) -> bool:
    """True for layers an adapter can wrap: e3nn ``o3.Linear`` and ``cuequivariance_torch.Linear``."""
    return _is_e3nn_linear(module) or is_cuet_linear(module)


def _layout_name(layout) -> str:
    """``"mul_ir"`` / ``"ir_mul"`` from a ``cue.IrrepsLayout`` (or its name)."""
    name = getattr(layout, "name", layout)
    if name not in ("mul_ir", "ir_mul"):
        raise ValueError(f"unsupported irreps layout {layout!r}; expected cue.mul_ir or cue.ir_mul")
    return name


def _check_cue_group(irreps, where: str) -> None:
    import cuequivariance as cue

    for mul, ir in irreps:
        if not isinstance(ir, cue.O3):
            raise TypeError(
                f"adapters on a cuequivariance_torch Linear need O(3) irreps (cue.O3 or a subclass such as "
                f"mace's O3_e3nn), whose 0e channels are the invariant scalars; {where} has irrep {ir!r} of "
                f"group {type(ir).__name__}")


def linear_layouts(base: nn.Module) -> Tuple[str, str, str, str]:
    """(irreps_in, irreps_out, input layout, output layout) of a supported linear layer."""
    if _is_e3nn_linear(base):
        return (IrrepsLayout.of(base.irreps_in).irreps_str, IrrepsLayout.of(base.irreps_out).irreps_str,
                "mul_ir", "mul_ir")
    if is_cuet_linear(base):
        _check_cue_group(base.irreps_in, "irreps_in")
        _check_cue_group(base.irreps_out, "irreps_out")
        # cuet.Linear keeps its layouts only in its transposes: input layout -> ir_mul -> output layout
        lin = _layout_name(base.transpose_in.source)
        lout = _layout_name(base.transpose_out.target)
        return (IrrepsLayout.of(base.irreps_in).irreps_str, IrrepsLayout.of(base.irreps_out).irreps_str, lin, lout)
    raise TypeError(
        f"adapters wrap e3nn o3.Linear layers; got {type(base).__module__}.{type(base).__name__} "
        f"(cuequivariance_torch.Linear layers are supported too)"
    )


def linear_irreps(base: nn.Module) -> Tuple[str, str, str]:
    """(irreps_in, irreps_out, layout) of a supported linear layer; the layout reads ``"a->b"`` when
    input and output layouts differ."""
    irreps_in, irreps_out, lin, lout = linear_layouts(base)
    return irreps_in, irreps_out, lin if lin == lout else f"{lin}->{lout}"


@dataclasses.dataclass(frozen=True)
class WeightPath:
    """One weight block of a linear layer: ``irreps_in[i_in] -> irreps_out[i_out]``, a row-major
    ``[mul_in, mul_out]`` block at ``offset`` of the flat weight (one weight class), scaled by
    ``path_weight`` in the forward."""

    i_in: int
    i_out: int
    mul_in: int
    mul_out: int
    path_weight: float
    offset: int

    @property
    def numel(self) -> int:
        return self.mul_in * self.mul_out


def _cuet_paths(base) -> Tuple[WeightPath, ...]:
    import cuequivariance as cue

    desc = cue.descriptors.linear(base.irreps_in, base.irreps_out)
    if len(desc.polynomial.operations) != 1:
        raise ValueError("unexpected cue.descriptors.linear: more than one operation")
    (_, stp), = desc.polynomial.operations
    if stp.subscripts != "uv,iu,iv":
        raise ValueError(f"unexpected cue.descriptors.linear subscripts {stp.subscripts!r}, expected 'uv,iu,iv'")
    seg_w = stp.operands[0].segments
    offsets, off = [], 0
    for shape in seg_w:
        offsets.append(off)
        off += int(shape[0]) * int(shape[1])
    if off != int(base.weight_numel):
        raise ValueError(f"descriptor weight has {off} elements, the layer {base.weight_numel}")
    paths, used = [], set()
    for path in stp.paths:
        s, i_in, i_out = (int(i) for i in path.indices)
        if s in used:
            raise ValueError(f"weight segment {s} feeds more than one path")
        used.add(s)
        mul_in, mul_out = (int(d) for d in seg_w[s])
        coeff = path.coefficients
        pw = float(coeff.item() if hasattr(coeff, "item") else coeff)
        paths.append(WeightPath(i_in, i_out, mul_in, mul_out, pw, offsets[s]))
    if used != set(range(len(seg_w))):
        raise ValueError("some weight segments of the descriptor feed no path")
    return tuple(sorted(paths, key=lambda p: p.offset))


def linear_paths(base: nn.Module) -> Tuple[WeightPath, ...]:
    """The weight blocks of a supported linear layer, in weight order (bias instructions of an
    ``o3.Linear`` are not part of its weight and are left out)."""
    if _is_e3nn_linear(base):
        out, off = [], 0
        for ins in base.instructions:
            if ins.i_in == -1:  # bias
                continue
            mul_in, mul_out = (int(d) for d in ins.path_shape)
            out.append(WeightPath(int(ins.i_in), int(ins.i_out), mul_in, mul_out, float(ins.path_weight), off))
            off += mul_in * mul_out
        return tuple(out)
    if is_cuet_linear(base):
        return _cuet_paths(base)
    linear_layouts(base)  # raises the "adapters wrap" error
    raise AssertionError("unreachable")


class AdapterLinear(nn.Module):
    """Common part of the adapter wrappers: the frozen base layer, irreps, layouts, on/off switch.

    TorchScript: ``torch.jit.script`` (and e3nn's ``jit.compile``, which mace-torch's LAMMPS export
    uses: adapters are marked ``compile_mode("script")``) compiles the adapter's scriptable form,
    returned by ``__prepare_scriptable__`` (see :mod:`mmea_kernels.nn.scriptable`).
    """

    method: str = ""
    # what e3nn's @compile_mode("script") sets (without importing e3nn here)
    __e3nn_compile_mode__ = "script"

    def __init__(self, base: nn.Module):
        super().__init__()
        irreps_in, irreps_out, lin, lout = linear_layouts(base)
        self.base = base
        self.irreps_in = base.irreps_in
        self.irreps_out = base.irreps_out
        self.base_kind = "cuet" if is_cuet_linear(base) else "e3nn"
        self.layout_name = lin if lin == lout else f"{lin}->{lout}"
        self.in_layout = IrrepsLayout.of(irreps_in, lin)
        self.out_layout = IrrepsLayout.of(irreps_out, lout)
        self.adapter_enabled = True

    def _factory(self):
        p = next(self.base.parameters(), None)
        if p is None:
            return {"dtype": torch.get_default_dtype(), "device": torch.device("cpu")}
        return {"dtype": p.dtype, "device": p.device}

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.in_layout.dim:
            raise ValueError(
                f"{type(self).__name__}: input has shape {tuple(x.shape)}, but irreps_in "
                f"{self.in_layout.irreps_str} needs the last dimension to be {self.in_layout.dim}"
            )

    def adapter_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def adapter_options(self) -> dict:
        raise NotImplementedError

    def merge(self) -> nn.Module:
        raise NotImplementedError

    def __prepare_scriptable__(self) -> nn.Module:
        """The module ``torch.jit.script`` compiles in place of this adapter: same parameters and
        base layer, same function, aten ops only (:func:`mmea_kernels.nn.scriptable.scriptable_adapter`)."""
        from .scriptable import scriptable_adapter
        return scriptable_adapter(self)
