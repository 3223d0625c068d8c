"""MMEA adapter: input-dependent magnitude gates on the output irreps of a frozen linear layer.

``z = SiLU(W_down x0 + b_down)``, ``γ = W_up z + b_up``; 0e outputs get ``+γ_add``, every other
(order, multiplicity) block is scaled by ``φ(γ_gate)``. Exactly O(3)-equivariant.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from ..layout import IrrepsLayout
from ..ops import gate_mul
from ..ops._utils import decided_once, reference_needed, rows2d, traced, transform_active
from ..ops.backends import cache_generation, check_backend_name
from . import path_choice
from .path_choice import _plan_env, fused_linear_enabled, fused_linear_mode  # noqa: F401 (public here too)
from .base import AdapterLinear, module_tensor, modules_bypassed
from .export_forms import NEQUIP_ATEN_MODIFIER

__all__ = ["MMEALinear", "MMEATensorProduct", "MMEAGating"]

PHIS = ("exp", "residual")
INITS = ("identity", "paper")


_ADAPTER = []


def _adapter_module():
    """:mod:`mmea_kernels.ops.gated_linear.adapter`, imported at first use (the fused kernels'
    modules are loaded lazily, after TRITON_INTERPRET is settled) and then kept: an import
    statement in the per-call path costs host time on every call."""
    if not _ADAPTER:
        from ..ops.gated_linear import adapter
        _ADAPTER.append(adapter)
    return _ADAPTER[0]


@decided_once  # decided once while tracing, outside the graph
def _compiled_plan(backend: Optional[str], device_type: str, dtype: torch.dtype, key: Optional[str]):
    """(spec key, kernel backend) of the fused linear's custom op for a compiled call, or None
    (``key``: the layer's spec key, "" where the fused kernels do not cover it). Its arguments are
    constants, not the layer, so that layers compiled one by one share one compiled code."""
    if not key or not fused_linear_enabled():
        return None
    from ..ops.gated_linear.function import _kernel_backend
    kernels = _kernel_backend(backend, device_type, dtype)
    return (key, kernels) if kernels else None


def _indices_after_load(module, incompatible_keys) -> None:
    """``load_state_dict(..., assign=True)`` into a layer built on the meta device gives it the loaded
    tensors but not the 0e indices (no state dict holds them): build them where the tensors are."""
    if module.in_scalar_columns.is_meta:
        p = next((t for t in module.parameters() if not t.is_meta), None)
        if p is not None:
            module._index_buffers(p.device)


class MMEAGating:
    """The MMEA gate network and gating, shared by the adapters of a linear layer
    (:class:`MMEALinear`) and of a tensor product (:class:`MMEATensorProduct`): the subclass sets
    ``in_layout`` (the input whose 0e channels feed the gate net) and ``out_layout`` (the gated
    output) and calls :meth:`_init_gating`."""

    # NequIP collects these from a model's modules and imports them before it loads an AOTInductor file
    # (nequip-compile): the file calls this package's custom ops, which `import mmea_kernels` registers
    _nequip_custom_ops_libs = ("mmea_kernels",)
    mmea_kernels_aten_only = NEQUIP_ATEN_MODIFIER  # NequIP model modifier (export_forms; cpp_ops: AdapterLinear)

    def _init_gating(self, rank, phi, init, init_std, backend, dtype, device) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if phi not in PHIS:
            raise ValueError(f"unknown phi {phi!r}; expected one of {PHIS}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        if init_std is not None and (isinstance(init_std, bool) or not isinstance(init_std, (int, float))
                                     or not math.isfinite(init_std) or init_std < 0):
            raise ValueError(f"init_std must be a finite number >= 0 (the std of the gate net's initial weights) "
                             f"or None, got {init_std!r}")
        check_backend_name(backend)
        self.rank, self.phi, self.init, self.init_std, self.backend = rank, phi, init, init_std, backend
        self.num_scalars_in = self.in_layout.num_scalars
        self.num_additive = self.out_layout.num_scalars
        self.num_gates = self.out_layout.num_gates
        fk = {"dtype": dtype, "device": device}
        n_out = self.num_additive + self.num_gates
        self._index_buffers(device)
        self.register_load_state_dict_post_hook(_indices_after_load)
        # (first, count) when the 0e input columns are one contiguous range: the gate net then reads a
        # view of them (no gather), and their gradient is a slice instead of an index_add
        self._scalar_span = self.in_layout.scalar_span
        if self.num_scalars_in > 0:
            self.mmea_down = nn.Linear(self.num_scalars_in, rank, **fk)
            self.mmea_up = nn.Linear(rank, n_out, **fk)
        else:
            self.mmea_down = None
            self.mmea_up = None
            self.mmea_static = nn.Parameter(torch.zeros(n_out, **fk))
        self.reset_adapter_parameters()

    def _index_buffers(self, device) -> None:
        """The 0e column indices (buffers not saved in the state dict; they follow ``.to(device)``)."""
        for name, layout in (("in_scalar_columns", self.in_layout), ("out_scalar_columns", self.out_layout)):
            self.register_buffer(name, torch.tensor(layout.scalar_columns, dtype=torch.long, device=device),
                                 persistent=False)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply``; a layer built on the meta device gets its index buffers rebuilt when it
        is given storage (``to_empty``: no state dict holds them, and empty storage is garbage)."""
        was_meta = self.in_scalar_columns.is_meta
        super()._apply(fn, recurse)
        if was_meta and not self.in_scalar_columns.is_meta:
            self._index_buffers(self.in_scalar_columns.device)
        return self

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        head_w = self.mmea_up.weight if self.mmea_up is not None else None
        head_b = self.mmea_up.bias if self.mmea_up is not None else self.mmea_static
        if self.mmea_down is not None:
            self.mmea_down.reset_parameters()
            head_w.zero_()
        head_b.zero_()
        if self.init == "paper" and self.num_additive > 0:
            a = self.num_additive
            if self.init_std is not None:
                if head_w is not None:
                    head_w[:a].normal_(0.0, self.init_std)
                head_b[:a].normal_(0.0, self.init_std)
            else:  # nn.Linear's default initialisation, restricted to the additive rows
                fan_in = self.rank if head_w is not None else 1
                bound_w = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5) bound = 1/√fan_in
                if head_w is not None:
                    head_w[:a].uniform_(-bound_w, bound_w)
                head_b[:a].uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def adapter_options(self) -> dict:
        return {"rank": self.rank, "phi": self.phi, "init": self.init, "init_std": self.init_std}

    def _scalar_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The 0e input columns of ``x``: a view when they are one contiguous range, else a gather."""
        span = self._scalar_span
        return x.narrow(-1, span[0], span[1]) if span is not None else x.index_select(-1, self.in_scalar_columns)

    def gamma(self, x: torch.Tensor, x0: Optional[torch.Tensor] = None):
        """(additive ``[N, S_out]``, gate logits ``[N, G]``), or shared ``[S_out]``, ``[G]`` for a layer
        without 0e input, for flattened input rows ``x`` (or their 0e columns ``x0`` when given)."""
        if self.mmea_up is None:
            gamma = self.mmea_static
        else:
            if x0 is None:
                x0 = self._scalar_inputs(x)
            gamma = self.mmea_up(torch.nn.functional.silu(self.mmea_down(x0)))
        return gamma[..., : self.num_additive], gamma[..., self.num_additive:]

    def gate_parameters(self, x: torch.Tensor, x0: Optional[torch.Tensor] = None, fused_net: Optional[str] = None):
        """(additive terms, gates ``φ(γ_gate)``) for flattened input rows ``x``. ``fused_net``: the
        kernel backend ("cpp", "triton") of the fused path, whose gate-net kernels then run the whole
        net as one op where they can (:func:`~mmea_kernels.ops.gate_net.gate_net`), else (and for
        None) the torch composition."""
        if fused_net and self.mmea_up is not None:
            from ..ops.gate_net import gate_net_kernels, gate_net_status
            x0 = self._scalar_inputs(x) if x0 is None else x0
            if gate_net_status(fused_net, x0, self.rank)[0]:
                down, up = self.mmea_down, self.mmea_up
                return gate_net_kernels(x0, down.weight, down.bias, up.weight, up.bias, self.num_additive, self.phi,
                                        fused_net)
        add, logits = self.gamma(x, x0)
        return add, (torch.exp(logits) if self.phi == "exp" else 1.0 + logits)

    def _gated(self, y: torch.Tensor, add, gates) -> torch.Tensor:
        """``y`` (the base output) with its gates and additive terms applied."""
        D = self.out_layout.dim
        if gates.dtype != y.dtype and torch.is_autocast_enabled(y.device.type):
            # the gate net's nn.Linear ran in autocast's dtype, the base layer maybe not: promote, as y * g would
            dt = torch.promote_types(y.dtype, gates.dtype)
            y, gates, add = y.to(dt), gates.to(dt), (add.to(dt) if add is not None else None)
        y2 = gate_mul(rows2d(y, D), gates, self.out_layout, backend=self.backend)
        if add is not None:
            if add.dim() == 1:
                add = add.expand(y2.shape[0], self.num_additive)
            # in place: gate_mul's output is fresh and its backward does not need it
            y2 = y2.index_add_(1, self.out_scalar_columns, add)
        return y2.reshape(y.shape)


class MMEALinear(MMEAGating, AdapterLinear):
    """Wraps a frozen ``o3.Linear`` or ``cuequivariance_torch.Linear`` (shared, not copied) and gates
    its output, in the layer's own layouts (``ir_mul`` features of a cuEquivariance layer are gated
    in place, without transposes: the 0e input channels and the per-(order, multiplicity) output
    columns are read from :class:`~mmea_kernels.layout.IrrepsLayout` tables of that layout).

    Args:
        base: the layer to adapt.
        rank: width ``r`` of the gate network's hidden layer.
        phi: ``"exp"`` (gate = exp γ) or ``"residual"`` (gate = 1 + γ).
        init: ``"identity"`` (``W_up = b_up = 0``: output equals the base output; bit for bit on the
            unfused path, to round-off on the fused kernels) or
            ``"paper"`` (the published recipe: the additive 0e head keeps PyTorch's default random
            initialisation, or ``normal(0, init_std)`` when ``init_std`` is given; gate rows zero).
        backend: gate-op backend (``None``: ``MMEA_BACKEND`` or auto). When it resolves to ``"triton"``,
            or to ``"cpp"`` (auto's choice on CPU once the extension is built) for float32/float64 CPU
            features, the base linear and the gate run as one fused kernel
            (:mod:`mmea_kernels.ops.gated_linear`); ``"torch"`` runs the base layer, then the gate (the
            unfused reference, also what TorchScript uses; under torch.compile the fused linear is one
            custom op and the gate net plain torch ops). ``MMEA_FUSED_LINEAR=0``
            in the environment keeps every layer on the unfused path (the gate then runs on the
            backend's gate kernels), for comparing the two paths on a device;
            ``MMEA_FUSED_LINEAR=auto`` times both once per row-count bucket and keeps the faster
            (:mod:`mmea_kernels.nn.path_choice`).

    A layer whose input has no 0e channel gets static learned gates and additive terms.
    """

    method = "mmea"
    option_names = ("phi", "init", "init_std", "backend")
    shaping_options = ("rank", "phi")
    runtime_options = ("backend",)
    mergeable = False

    def __init__(self, base: nn.Module, rank: int = 16, phi: str = "exp", init: str = "identity",
                 init_std: Optional[float] = None, backend: Optional[str] = None):
        super().__init__(base)
        self.check_feature_channels("MMEA")  # gates from each input row scale the output row beside it
        self._init_gating(rank, phi, init, init_std, backend, **self._factory())
        self._fused_spec()  # sets the spec key that a compiled call reads

    def _fused(self, x: torch.Tensor, args, kwargs):
        """(LinearSpec, kernel backend) when a fused linear+gate kernel should run (triton; cpp for
        float32/float64 CPU tensors), else None; under torch.compile (spec key, kernel backend), for
        the fused linear's custom op. For a call with extra arguments, and with
        ``MMEA_FUSED_LINEAR=0`` in the environment (for comparing the two paths on a device), with a
        hook on the base layer or the gate net's layers, and under autocast, the unfused path runs; with ``MMEA_FUSED_LINEAR=auto`` the faster of the two for this row count
        (:meth:`_auto_plan`)."""
        mods = self._modules
        if args or kwargs or modules_bypassed(mods["base"], mods.get("mmea_down"), mods.get("mmea_up")):
            return None  # hooks on the layers or autocast: the unfused path calls the layers
        if traced(x):  # torch.compile or fake tensors: the custom op, or the torch path under torch.func
            return None if reference_needed(x) else \
                _compiled_plan(self.backend, x.device.type, x.dtype, getattr(self, "_kernel_key", None))
        # the decision depends only on these (and the installed kernels: cache_generation), so it is
        # made once per key: per call it is one dict lookup instead of tens of µs of host time
        key = (x.device, x.dtype, self.backend, _plan_env(), cache_generation())
        plans = self.__dict__.setdefault("_eager_plans", {})
        entry = plans.get(key)
        if entry is None:  # the entry built here is the one used (another thread may clear the dict)
            plans.clear()  # one live entry: the key changes only when the setup does
            self.__dict__.pop("_auto_choices", None)  # and the timed choices belong to the old setup
            entry = plans[key] = (self._eager_plan(x), fused_linear_mode() == "auto")
        plan, auto = entry
        return self._auto_plan(x, plan) if auto and plan is not None else plan

    def __getstate__(self):
        # the cached decisions belong to this process (its environment, installed kernels and
        # hardware): a pickled or deep-copied layer decides again where it runs
        state = dict(super().__getstate__())
        state.pop("_eager_plans", None)
        state.pop("_auto_choices", None)
        return state

    def _eager_plan(self, x: torch.Tensor):
        if not fused_linear_enabled():
            return None
        # imported here: the fused triton kernels are decorated only when first used, after
        # TRITON_INTERPRET is settled (as the gate backends are loaded lazily)
        from ..ops.gated_linear.function import _kernel_backend
        kernels = _kernel_backend(self.backend, x.device.type, x.dtype)
        if kernels is None:
            return None
        spec = self._fused_spec()
        if not spec:
            return None
        # whether the whole adapter can be one autograd node (_one_node): fixed by the layer and
        # this key, so decided here, not per call
        from ..ops.gate_net import gate_net_status
        one = self.mmea_up is not None and self._scalar_span is not None \
            and gate_net_status(kernels, x, self.rank)[0]
        return spec, kernels, one

    def _auto_plan(self, x: torch.Tensor, plan):
        """``plan`` or None (the unfused path), whichever ran faster on this layer the first time it
        saw a row count of this bucket with this gradient need (timed on a detached copy of ``x``)."""
        if not path_choice.may_time(x):
            return plan  # the fused path, undecided: a capture, a tracer or a dispatch mode is active
        rows = math.prod(x.shape[:-1])  # not numel // dim: a layer without input columns has dim 0
        # read from the module dicts (module_tensor): this runs on every call, nn.Module.__getattr__ costs µs
        up = self._modules.get("mmea_up")
        head = module_tensor(up, "weight") if up is not None else module_tensor(self, "mmea_static")
        grad = torch.is_grad_enabled() and (x.requires_grad or head.requires_grad)
        choices = self.__dict__.setdefault("_auto_choices", {})
        ckey = (path_choice.row_bucket(rows), grad)
        choice = choices.get(ckey)
        if choice is None:
            # own saved-tensor hooks: an outer pair (activation checkpointing, offloading) must not
            # see the timing runs' graphs, which the checkpoint's recompute would not repeat
            with torch.autograd.graph.saved_tensors_hooks(path_choice.same, path_choice.same):
                choice = choices[ckey] = path_choice.timed_choice(self, x, plan, rows, grad)
        return plan if choice.fused else None

    def _eager_path(self, x2: torch.Tensor, fused) -> torch.Tensor:
        """The eager output rows for flattened input rows ``x2``: the fused kernels for a plan
        (LinearSpec, kernel backend, whether one node may run the whole adapter), the base layer and
        then the gate for None."""
        if fused is not None and transform_active():
            fused = None  # forward AD / torch.func: the fused kernels have no forward-mode formula
        if fused is None:
            add, gates = self.gate_parameters(x2)
            return self._gated(self.base(x2), add if self.num_additive > 0 else None, gates)
        if fused[2] and torch.is_grad_enabled():
            one = self._one_node(x2, fused)
            if one is not None:
                return one
        from ..ops.gated_linear.adapter import split_scalars
        from ..ops.gated_linear.function import gated_linear_prepared
        x0 = None
        if self.mmea_up is not None and self._scalar_span is not None and x2.requires_grad \
                and torch.is_grad_enabled():
            # the gate net's 0e gradient joins the kernel's input gradient in place (no
            # zero-filled [N, D_in] gradient for the slice, no extra add pass over it)
            x2, x0 = split_scalars(x2, *self._scalar_span)
        add, gates = self.gate_parameters(x2, x0, fused_net=fused[1])
        add = add if self.num_additive > 0 else None
        weight, bias = self.view.fused_tensors(self.base)
        return gated_linear_prepared(x2, weight, bias, gates, add, fused[0], fused[1])

    def _one_node(self, x2: torch.Tensor, fused) -> Optional[torch.Tensor]:
        """The output of the whole adapter as one autograd node
        (:func:`~mmea_kernels.ops.gated_linear.adapter.mmea_adapter_fused`) for a plan that allows it
        (``fused[2]``: a gate net on contiguous 0e columns whose kernels run for this backend, dtype
        and device) in grad mode, where a graph is built and all operands share ``x2``'s dtype and
        device; else None. This runs on every training and force call: at MD sizes its host time is
        a visible part of the layer's, so it reads the modules' dicts and checks inline."""
        mods = self._modules
        down, up = mods["mmea_down"], mods["mmea_up"]
        wd, bd = module_tensor(down, "weight"), module_tensor(down, "bias")
        wu, bu = module_tensor(up, "weight"), module_tensor(up, "bias")
        if not (x2.requires_grad or wd.requires_grad or bd.requires_grad or wu.requires_grad or bu.requires_grad):
            return None  # frozen gates: the single-node fused linear of the no-gradient path
        weight, bias = self.view.fused_tensors(mods["base"])
        dtype, device = x2.dtype, x2.device
        for t in (weight, wd, bd, wu, bu) if bias is None else (weight, bias, wd, bd, wu, bu):
            if t.dtype is not dtype or t.device != device:
                return None  # the composition's checks name the mismatch
        span = self._scalar_span
        return _adapter_module().mmea_adapter_fused(x2, weight, bias, wd, bd, wu, bu, self.num_additive, self.phi,
                                                    span[0], span[1], fused[0], fused[1])

    def _fused_spec(self):
        """The :class:`LinearSpec` of the fused kernels for this layer, or False where they do not
        cover it (built once; ``_kernel_key`` is its key string, "" for False)."""
        spec = getattr(self, "_kernel_spec", None)
        if spec is None:
            try:
                spec = self.view.fused_spec(self.base, self.spec)
                if self.view.fused_tensors(self.base)[0].numel() != spec.weight_numel:
                    raise ValueError("the layer's weight is not the flat weight of its spec")
            except (TypeError, ValueError):
                spec = False  # a layer the fused kernels do not cover: keep the unfused path
            self._kernel_spec, self._kernel_key = spec, (spec.key_text if spec else "")
        return spec

    def fused_kernel(self, x: torch.Tensor) -> Optional[str]:
        """The fused kernel backend ("cpp", "triton") that a plain call on tensors like ``x`` runs,
        or None for the unfused path (under ``MMEA_FUSED_LINEAR=auto``: the choice for ``x``'s row
        count and gradient need, timed first if this layer has not made it yet)."""
        fused = self._fused(x, (), {})
        return fused[1] if fused is not None else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.check_input(x)
        if not self.adapter_enabled:
            return self.base(x, *args, **kwargs)
        # rows of a 2-D input as they are: a reshape would add a view (and its backward node) per call
        x2 = x if x.dim() == 2 else rows2d(x, self.in_layout.dim)
        fused = self._fused(x, args, kwargs)
        if fused is not None and traced(x):
            # compiled: the fused linear as one custom op, the gate net as torch ops (for the compiler)
            add, gates = self.gate_parameters(x2)
            weight, bias = self.view.fused_tensors(self.base)
            add = add if self.num_additive > 0 else None
            if self.num_gates > 0 and gates.requires_grad and torch.is_grad_enabled():  # saves u (as eager)
                y2 = torch.ops.mmea_kernels.gated_linear_u(x2, weight, bias, gates, add, *fused)[0]
            else:
                y2 = torch.ops.mmea_kernels.gated_linear(x2, weight, bias, None, gates, add, *fused)
            return y2.reshape(x.shape[:-1] + (self.out_layout.dim,))
        if fused is not None:  # one kernel: linear with the gate and additive terms in its epilogue
            y2 = self._eager_path(x2, fused)
            return y2 if x2 is x else y2.reshape(x.shape[:-1] + (self.out_layout.dim,))
        add, gates = self.gate_parameters(x2)
        add = add if self.num_additive > 0 else None
        return self._gated(self.base(x, *args, **kwargs), add, gates)

    def merge(self) -> nn.Module:
        raise RuntimeError(
            "MMEA adapters cannot be merged into the base weights: their gates depend on each input's "
            "scalar channels, so no fixed weight reproduces them. Keep the adapter (or use unload() "
            "to drop it)."
        )

    def extra_repr(self) -> str:
        return (f"irreps_in={self.in_layout.irreps_str}, irreps_out={self.out_layout.irreps_str}, "
                f"rank={self.rank}, phi={self.phi!r}, gates={self.num_gates}, additive={self.num_additive}")



class MMEATensorProduct(MMEAGating, nn.Module):
    """MMEA gating on the output of a frozen e3nn ``TensorProduct`` (the design's "gating inside
    the tensor-product output path"): the gate net reads the 0e channels of the first input (for a
    MACE/SevenNet convolution: the sender's node features of each edge), every 0e output channel
    gets ``+γ_add``, every other (order, multiplicity) block of ``irreps_out`` is scaled by
    ``φ(γ_gate)``. As equivariant as the gate on a linear layer; the identity at initialisation.
    Used by the ``mmea-tp`` fine-tuning method; not injected by :func:`inject_adapters` and without
    a TorchScript form."""

    method = "mmea"

    def __init__(self, base: nn.Module, rank: int = 16, phi: str = "exp", init: str = "identity",
                 init_std: Optional[float] = None, backend: Optional[str] = None):
        nn.Module.__init__(self)
        for attr in ("irreps_in1", "irreps_out"):
            if not hasattr(base, attr):
                raise TypeError(f"MMEATensorProduct wraps an e3nn TensorProduct; {type(base).__name__} has no {attr}")
        self.base = base
        self.in_layout = IrrepsLayout.of(base.irreps_in1)
        self.out_layout = IrrepsLayout.of(base.irreps_out)
        self.adapter_enabled = True
        p = next(iter([t for t in list(base.parameters()) + list(base.buffers()) if t.is_floating_point()]), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.get_default_dtype(), torch.device("cpu"))
        self._init_gating(rank, phi, init, init_std, backend, dtype, device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if not self.adapter_enabled:
            return y
        x2 = rows2d(x, self.in_layout.dim)
        # the gate net as one op where the fused kernels run (as on MMEALinear's fused path)
        from ..ops.gated_linear import kernel_backend
        mods = self._modules  # hooks on the gate net or autocast: its layers are called (modules_bypassed)
        fused_net = None if traced(x2) or modules_bypassed(None, mods.get("mmea_down"), mods.get("mmea_up")) \
            else kernel_backend(self.backend, x2)
        add, gates = self.gate_parameters(x2, fused_net=fused_net)
        return self._gated(y, add if self.num_additive > 0 else None, gates)

    def __prepare_scriptable__(self):
        raise NotImplementedError("MMEATensorProduct (the mmea-tp method) has no TorchScript form")

    def extra_repr(self) -> str:
        return (f"irreps_in1={self.in_layout.irreps_str}, irreps_out={self.out_layout.irreps_str}, "
                f"rank={self.rank}, phi={self.phi!r}, gates={self.num_gates}, additive={self.num_additive}")
