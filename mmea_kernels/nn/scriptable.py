"""TorchScript forms of the adapters.

:class:`~mmea_kernels.nn.MMEALinear` and :class:`~mmea_kernels.nn.ELoRALinear` keep an eager forward
that TorchScript cannot compile (``*args`` passed to the base layer, backend selection, the fused
Triton kernel, layout objects). Instead they implement ``__prepare_scriptable__``, the hook
``torch.jit.script`` calls on every module before compiling it: it returns one of the modules
below, which holds the *same* parameters and the same base layer and computes the same function
with plain aten ops only:

* MMEA: ``x0 = x[:, scalar columns]``, ``γ = up(SiLU(down(x0)))`` (or the static ``γ``), then the
  gate multiply as one gather (``[gates, 1][gate index of each column]``, 1 on 0e columns) and the
  additive terms as one ``index_add`` on the 0e output columns: the torch backend's gate, written
  out, with index tables as (non-persistent) buffers.
* ELoRA: ``W + (α/r)·concat_i(A_i B_i)`` passed to the base layer as its weight (a
  ``cuet.Linear``, which refuses a weight argument when its weights are internal, is run through its
  own ``transpose_in`` -> segmented polynomial ``f`` -> ``transpose_out`` with the updated weight).

A scripted model therefore contains no ``mmea_kernels`` op and loads with ``torch.jit.load`` (or
libtorch, e.g. LAMMPS' ``pair_style mace``) without this package. The exception is opt-in: scripted
inside :func:`script_kernels` ``("cpp")`` (``export --kernels cpp``), MMEA adapters on e3nn linears
become :class:`ScriptableMMEAFusedLinear`, one op of this package's C++ extension, and the file then
needs those kernels loaded (``mmea_kernels.load_kernels()``; the LAMMPS plugins' ``mmea_ops.so``). Eager behaviour of the adapters is
unchanged: the scriptable forms are only built when scripting.

Scripting replaces each adapter by its scriptable form in the module tree it compiles (torch's
``__prepare_scriptable__`` protocol edits ``_modules`` in place, as e3nn's in-place
``jit.compile`` does with every submodule it compiles); :mod:`mmea_kernels.integrations.export` scripts a copy
and leaves the eager model alone. After ``torch.jit.script(model)`` the eager ``model`` computes the
same function through the scriptable forms; each form keeps the eager module it was made from
(``_eager_form``, not compiled), and :func:`restore_eager_forms` puts those back: the peft functions
(``inject_adapters``, ``unload``, ``disable_adapters``, ``adapter_state_dict``, ...) and
``replace_gates`` / ``restore_gates`` call it first, so they act on the eager adapters and gates.

Not supported (a clear error when scripting): an MMEA adapter whose gate backend is pinned to
``"cpp"`` or ``"triton"`` (a scripted model runs the gate in aten ops; unpin it with
``adapter.backend = None``), ELoRA on a ``cuet.Linear`` without the ``f`` / ``transpose_in`` /
``transpose_out`` submodules of cuequivariance-torch 0.13 (merge it first: ``merge_and_unload``).
"""
import contextlib
from typing import Dict, List, Optional

import torch
from torch import nn

from ..ops._utils import rows2d

__all__ = ["ScriptableMMEALinear", "ScriptableMMEAFusedLinear", "ScriptableMMEACuetLinear", "ScriptableELoRALinear",
           "ScriptableELoRACuetLinear", "scriptable_adapter", "check_scriptable", "script_kernels",
           "fused_form_reason", "fused_forms", "restore_eager_forms", "keep_eager_form"]

# e3nn's @compile_mode("script") sets this class attribute; set it directly so that this module
# does not import e3nn. e3nn.util.jit.compile then scripts these modules (and the adapters).
E3NN_COMPILE_MODE = "__e3nn_compile_mode__"

SCRIPTABLE_BACKENDS = (None, "auto", "torch")
EAGER_FORM = "_eager_form"  # on a scriptable form: [the eager module it was made from]; not compiled


def keep_eager_form(form: nn.Module, eager: nn.Module) -> None:
    """Record on ``form`` (a scriptable form) the eager module it stands for (in a list: no submodule,
    no state-dict entry; ``__jit_ignored_attributes__`` keeps TorchScript off it)."""
    form.__dict__[EAGER_FORM] = [eager]


def restore_eager_forms(model: nn.Module) -> int:
    """Put back, in place, the eager module of every scriptable form inside ``model`` (the adapters and
    FusedGates that ``torch.jit.script(model)`` replaced in ``model``'s own tree); returns how many."""
    return len(_restore_eager_forms(model))


def _restore_eager_forms(model: nn.Module) -> list:
    """:func:`restore_eager_forms`; returns (parent, name, form) of each put back, to undo it."""
    if isinstance(model, torch.jit.ScriptModule):
        return []
    # not inside a model compiled in place (e3nn's jit.compile, mace's LAMMPS path): its modules and the
    # forms' bases are ScriptModules there, which take no reassignment and no eager call
    found = [(parent, name, child) for parent in model.modules()
             if not isinstance(parent, torch.jit.ScriptModule)
             for name, child in parent._modules.items() if child is not None and EAGER_FORM in child.__dict__
             and not isinstance(child, torch.jit.ScriptModule)
             and not any(isinstance(m, torch.jit.ScriptModule) for m in child.__dict__[EAGER_FORM][0].modules())]
    for parent, name, form in found:
        parent._modules[name] = form.__dict__[EAGER_FORM][0]
    return found


def check_scriptable(adapter, name: str = "") -> None:
    """Raise a clear error when ``adapter`` cannot be turned into a TorchScript module."""
    where = f"adapter {name!r}" if name else f"this {type(adapter).__name__}"
    if "backend" in adapter.runtime_options:  # an adapter whose gate op has a backend (MMEA)
        backend = adapter.backend.strip().lower() if isinstance(adapter.backend, str) else adapter.backend
        if backend not in SCRIPTABLE_BACKENDS:
            raise NotImplementedError(
                f"{where} has its gate backend pinned to {adapter.backend!r}: a TorchScript model runs the gate "
                "in plain aten ops (the torch backend's gather-multiply, so that the saved model loads in "
                "libtorch / LAMMPS without mmea_kernels) and cannot honour that choice. Unpin it before "
                "scripting (adapter.backend = None, or 'torch'); the numbers are the same. For the C++ kernels in "
                "the file, unpin it and script with script_kernels('cpp') (export --kernels cpp).")
    adapter.view.check_scriptable(adapter.base, adapter.method, where)


KERNELS = ("aten", "cpp")
_kernels = ["aten"]  # what scripting builds now (script_kernels)


@contextlib.contextmanager
def script_kernels(kernels: str, model: Optional[nn.Module] = None):
    """Within the block, scripting builds MMEA adapters on e3nn linears as
    :class:`ScriptableMMEAFusedLinear` (``"cpp"``: one op of this package's C++ extension, forward
    and first derivative; the file then needs the extension's kernels to load) instead of the
    portable aten form (``"aten"``, the default). Adapters the fused op does not cover keep the aten
    form (:func:`fused_form_reason` says why). Pass the ``model`` to be scripted: its adapters' layer
    specs are built first, while their base layers are still eager."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: expected one of {KERNELS}")
    if kernels == "cpp":
        from ..ops.gated_linear.cpp_kernels import cpp_status

        ok, why = cpp_status("cpu")
        if not ok:
            raise RuntimeError(f"kernels='cpp' needs this package's C++ extension: {why}")
        if model is not None:
            fused_forms(model)  # the layers' specs, from the eager bases, before scripting replaces them
    _kernels.append(kernels)
    try:
        yield
    finally:
        _kernels.pop()


def fused_forms(model: nn.Module) -> Dict[str, Optional[str]]:
    """:func:`fused_form_reason` of every adapter of ``model`` (by module name), after building the
    layer specs the fused form reads (from the eager base layers: call it before scripting)."""
    restore_eager_forms(model)  # the adapters an earlier torch.jit.script(model) replaced
    out: Dict[str, Optional[str]] = {}
    for name, m in model.named_modules():
        if hasattr(m, "adapter_enabled") and hasattr(m, "method"):
            if m.method == "mmea" and hasattr(m, "_fused_spec"):
                m._fused_spec()
            out[name] = fused_form_reason(m)
    return out


def fused_form_reason(adapter) -> Optional[str]:
    """None when the fused op (:class:`ScriptableMMEAFusedLinear`) covers ``adapter``, else why not."""
    if adapter.method != "mmea" or adapter.view.kind != "e3nn":
        return f"{adapter.method} adapter on a {adapter.view.kind} layer (the fused op: MMEA on e3nn o3.Linear)"
    if adapter.mmea_up is None or adapter.mmea_down is None:
        return "no gate network (a static gate)"
    if adapter.in_layout.scalar_span is None:
        return "its 0e input columns are not one contiguous range"
    spec = getattr(adapter, "_kernel_spec", None)  # built while the base is eager (script_kernels)
    if spec is None:
        return "its kernel spec was not built before scripting (script the model inside script_kernels)"
    if not spec:
        return "the fused linear kernels do not cover this layer"
    weight = getattr(adapter.base, "weight", None)  # the base may be scripted already (e3nn compiles bottom-up)
    if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64):
        return "its weights are not float32 / float64 CPU tensors"
    return None


def scriptable_adapter(adapter) -> nn.Module:
    """The TorchScript form of an ``MMEALinear`` / ``ELoRALinear`` (shares its parameters)."""
    check_scriptable(adapter)
    if _kernels[-1] == "cpp" and fused_form_reason(adapter) is None:
        form = ScriptableMMEAFusedLinear(adapter)
    else:
        try:
            cls = adapter.view.scriptable_class(adapter.method)
        except KeyError:
            raise NotImplementedError(f"no TorchScript form for {type(adapter).__name__} (method {adapter.method!r})") \
                from None
        form = cls(adapter)
    keep_eager_form(form, adapter)
    return form


class _ScriptableMMEA(nn.Module):
    """MMEA in aten ops; subclasses call the base layer with its own signature."""

    __jit_ignored_attributes__ = [EAGER_FORM]

    dim_in: int
    dim_out: int
    num_additive: int
    num_gates: int
    phi_exp: bool
    adapter_enabled: bool
    irreps_in_str: str
    scalar_first: int
    scalar_count: int
    all_scalar_out: bool

    def __init__(self, adapter):
        super().__init__()
        from ..ops.tables import layout_tables

        self.base = adapter.base
        self.dim_in = int(adapter.in_layout.dim)
        self.dim_out = int(adapter.out_layout.dim)
        self.num_additive = int(adapter.num_additive)
        self.num_gates = int(adapter.num_gates)
        self.phi_exp = adapter.phi == "exp"
        self.adapter_enabled = bool(adapter.adapter_enabled)
        self.irreps_in_str = adapter.in_layout.irreps_str
        # as the eager adapter: the 0e input columns as a view when they are one range; an output of
        # 0e columns only has no gate to multiply by and takes the additive terms as one add
        span = adapter.in_layout.scalar_span
        self.scalar_first, self.scalar_count = (int(span[0]), int(span[1])) if span is not None else (-1, 0)
        scalars = tuple(adapter.out_layout.scalar_columns)
        self.all_scalar_out = self.num_gates == 0 and scalars == tuple(range(self.dim_out))
        self.mmea_down = adapter.mmea_down
        self.mmea_up = adapter.mmea_up
        self.mmea_static = getattr(adapter, "mmea_static", None) if adapter.mmea_up is None else None
        device = adapter.in_scalar_columns.device
        self.register_buffer("in_scalar_columns", adapter.in_scalar_columns, persistent=False)
        self.register_buffer("out_scalar_columns", adapter.out_scalar_columns, persistent=False)
        # gate index of every output column, num_gates for 0e columns (they read the appended 1)
        self.register_buffer("gate_index_ext", layout_tables(adapter.out_layout, device).gate_index_ext.clone(),
                             persistent=False)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.size(-1) != self.dim_in:
            raise ValueError("MMEA adapter: input has shape {}, but irreps_in {} needs the last dimension to be {}"
                             .format(x.shape, self.irreps_in_str, self.dim_in))

    def _adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gated output for input ``x`` and base output ``y``. One method with the linears
        written out: a scripted model runs op by op, and at molecular-dynamics sizes (a few hundred
        atoms) each call's fixed cost, not the arithmetic, is most of what the adapter adds."""
        x2 = rows2d(x, self.dim_in)
        y2 = rows2d(y, self.dim_out)
        n = y2.size(0)
        down = self.mmea_down
        up = self.mmea_up
        if down is not None and up is not None:
            if self.scalar_first >= 0:
                x0 = x2.narrow(1, self.scalar_first, self.scalar_count)
            else:
                x0 = x2.index_select(1, self.in_scalar_columns)
            z = torch.nn.functional.silu(torch.addmm(down.bias, x0, down.weight.t()))
            gamma = torch.addmm(up.bias, z, up.weight.t())
            if self.all_scalar_out:  # out_scalar_columns is 0..dim_out-1
                return (y2 + gamma).reshape(y.shape)
            logits = gamma.narrow(1, self.num_additive, self.num_gates)
            gates = torch.exp(logits) if self.phi_exp else 1.0 + logits
            # gather, not index_select(1, ...): 4-5x faster on CPU, forward and backward (measured by hand
            # at 162 and 2000 rows, float64; index_select along dim 1 walks the columns one at a time)
            y2 = y2 * torch.cat([gates, gates.new_ones(n, 1)], 1).gather(1, self.gate_index_ext.expand(n, self.dim_out))
            if self.num_additive > 0:  # in place: the product is not saved for the backward
                y2.index_add_(1, self.out_scalar_columns, gamma.narrow(1, 0, self.num_additive))
            return y2.reshape(y.shape)
        static = self.mmea_static
        assert static is not None
        if self.all_scalar_out:
            return (y2 + static).reshape(y.shape)
        logits = static[self.num_additive:]
        gates = torch.exp(logits) if self.phi_exp else 1.0 + logits
        y2 = y2 * torch.cat([gates, gates.new_ones(1)]).index_select(0, self.gate_index_ext)
        if self.num_additive > 0:
            y2.index_add_(1, self.out_scalar_columns, static[: self.num_additive].expand(n, self.num_additive))
        return y2.reshape(y.shape)

    def extra_repr(self) -> str:
        return (f"irreps_in={self.irreps_in_str}, dim_out={self.dim_out}, gates={self.num_gates}, "
                f"additive={self.num_additive}, phi={'exp' if self.phi_exp else 'residual'}")


class ScriptableMMEALinear(_ScriptableMMEA):
    """TorchScript form of an ``MMEALinear`` on an e3nn ``o3.Linear`` (same forward signature)."""

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(x)
        y = self.base(x, weight, bias)
        if not self.adapter_enabled:
            return y
        return self._adapt(x, y)


class ScriptableMMEAFusedLinear(ScriptableMMEALinear):
    """An ``MMEALinear`` on an e3nn ``o3.Linear`` as one call of the C++ extension's
    ``mmea_kernels_ext::mmea_linear`` (csrc/adapter_op.cpp: the fused linear + gate kernels, first
    derivative with respect to the input in C++) on float32 / float64 CPU input with the layer's own
    weights; anything else (another device or dtype, weights passed in) runs the aten form. A file
    with it loads where the extension is loaded: Python after ``mmea_kernels.load_kernels()``,
    LAMMPS through the plugins of ``mmea-kernels lammps-build``."""

    # NequIP's Python loader imports these before it loads an AOTInductor file (export_forms "cpp")
    _nequip_custom_ops_libs = ("mmea_kernels",)
    phi_code: int
    out_first: int
    k_path_weights: torch.Tensor
    k_t_path_weights: torch.Tensor
    block_w: int
    t_block_w: int

    def __init__(self, adapter):
        super().__init__(adapter)
        from ..ops.gate_net.function import PHI_CODES
        from ..ops.gated_linear.cpp_kernels import cpp_tables
        from ..ops.tables import layout_tables

        spec = adapter._kernel_spec
        t, tt = cpp_tables(spec, "cpu"), cpp_tables(spec.transposed, "cpu")
        lt = layout_tables(adapter.out_layout, "cpu")
        for name, value in (("k_tasks", t.tasks), ("k_instructions", t.instructions), ("k_t_tasks", tt.tasks),
                            ("k_t_instructions", tt.instructions), ("k_gate_of_column", lt.gate_of_column),
                            ("k_gate_cols", lt.gate_cols_padded)):
            self.register_buffer(name, value.clone(), persistent=False)
        # the float64 path weights the kernels read, as plain attributes, not buffers: Module.to(dtype)
        # converts floating buffers (a float32 round trip would round them), never plain attributes
        self.k_path_weights = t.path_weights.clone()
        self.k_t_path_weights = tt.path_weights.clone()
        self.phi_code = int(PHI_CODES[adapter.phi])
        span = adapter.out_layout.scalar_span
        self.out_first = int(span[0]) if span is not None and self.num_additive > 0 else -1
        self.block_w, self.t_block_w = int(t.block_w), int(tt.block_w)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(x)
        down = self.mmea_down
        up = self.mmea_up
        w = self.base.weight
        if (down is None or up is None or not self.adapter_enabled or weight is not None or bias is not None
                or x.device.type != "cpu" or x.dtype != w.dtype
                or not (x.dtype == torch.float32 or x.dtype == torch.float64)):
            y = self.base(x, weight, bias)
            return self._adapt(x, y) if self.adapter_enabled else y
        b: Optional[torch.Tensor] = self.base.bias
        if b is not None and b.numel() == 0:
            b = None
        x2 = rows2d(x, self.dim_in)
        y2 = torch.ops.mmea_kernels_ext.mmea_linear(
            x2, w, b, down.weight, down.bias, up.weight, up.bias, self.k_tasks, self.k_instructions,
            self.k_path_weights, self.k_t_tasks, self.k_t_instructions, self.k_t_path_weights, self.k_gate_of_column,
            self.k_gate_cols, self.out_scalar_columns, self.num_additive, self.phi_code, self.scalar_first,
            self.scalar_count, self.out_first, self.block_w, self.t_block_w)
        return y2.reshape(list(x.shape[:-1]) + [self.dim_out])


class ScriptableMMEACuetLinear(_ScriptableMMEA):
    """TorchScript form of an ``MMEALinear`` on a ``cuequivariance_torch.Linear`` (same forward
    signature; features in the layer's own layouts)."""

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                weight_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(x)
        y = self.base(x, weight, weight_indices)
        if not self.adapter_enabled:
            return y
        return self._adapt(x, y)


class _ScriptableELoRA(nn.Module):
    __jit_ignored_attributes__ = [EAGER_FORM]
    scaling: float
    adapter_enabled: bool
    merged: bool
    dim_in: int
    irreps_in_str: str

    def __init__(self, adapter):
        super().__init__()
        self.base = adapter.base
        self.elora_A = adapter.elora_A
        self.elora_B = adapter.elora_B
        self.scaling = float(adapter.scaling)
        self.adapter_enabled = bool(adapter.adapter_enabled)
        self.merged = bool(getattr(adapter, "merged", False))  # ΔW in base.weight already (ELoRALinear.merge)
        self.dim_in = int(adapter.in_layout.dim)
        self.irreps_in_str = adapter.in_layout.irreps_str

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.size(-1) != self.dim_in:
            raise ValueError("ELoRA adapter: input has shape {}, but irreps_in {} needs the last dimension to be {}"
                             .format(x.shape, self.irreps_in_str, self.dim_in))

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + ΔW`` (as ``ELoRALinear.delta_weight``: blocks row-major, concatenated, scaled), or
        ``W − ΔW`` for a merged adapter that is disabled."""
        parts: List[torch.Tensor] = []
        for A, B in zip(self.elora_A, self.elora_B):
            parts.append((A @ B).reshape(-1))
        if len(parts) == 0:
            return weight + torch.zeros_like(weight)
        sign = 1.0 if self.adapter_enabled else -1.0
        return weight + sign * (torch.cat(parts) * self.scaling).reshape(weight.shape)


class ScriptableELoRALinear(_ScriptableELoRA):
    """TorchScript form of an ``ELoRALinear`` on an e3nn ``o3.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.adapter_enabled == self.merged:  # unmerged and off, or merged and on: the base weights as they are
            return self.base(x)
        return self.base(x, self._weight(self.base.weight))


class ScriptableELoRACuetLinear(_ScriptableELoRA):
    """TorchScript form of an ``ELoRALinear`` on a ``cuequivariance_torch.Linear`` (one internal
    weight class): the layer's own computation with the updated weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.adapter_enabled == self.merged:
            return self.base(x)
        no_indices: Dict[int, torch.Tensor] = {}
        out = self.base.f([self._weight(self.base.weight), self.base.transpose_in(x)], input_indices=no_indices)
        return self.base.transpose_out(out[0])


for _cls in (ScriptableMMEALinear, ScriptableMMEACuetLinear, ScriptableELoRALinear, ScriptableELoRACuetLinear):
    setattr(_cls, E3NN_COMPILE_MODE, "script")
del _cls
