"""Export forms in an eager model, for ``torch.export`` / AOTInductor files that run without Python
(libtorch's AOTI loader, NequIP's ``pair_nequip``): :func:`aten_forms` (aten ops only: the file needs
nothing of this package) and :func:`export_forms` with ``kernels="cpp"`` (MMEA adapters as this
package's C++ op, registered in C++: the file needs ``mmea_kernels._C`` or the LAMMPS plugins'
``mmea_ops.so`` loaded, not Python), and the NequIP model modifiers ``mmea_kernels_aten_only`` and
``mmea_kernels_cpp_ops`` that apply them in ``nequip-compile``. The forms are those of
:mod:`mmea_kernels.nn.scriptable`."""
import contextlib
from typing import Dict

from torch import nn

from .scriptable import KERNELS, _restore_eager_forms, check_scriptable, script_kernels, scriptable_adapter

__all__ = ["aten_forms", "export_forms", "NEQUIP_ATEN_MODIFIER", "NEQUIP_CPP_MODIFIER"]


def aten_forms(model: nn.Module) -> Dict[str, str]:
    """:func:`export_forms` with ``kernels="aten"``."""
    return export_forms(model, "aten")


def export_forms(model: nn.Module, kernels: str = "aten") -> Dict[str, str]:
    """Replace, in place, every adapter and FusedGate inside ``model`` by its aten form (the module
    ``torch.jit.script`` compiles in its place: the same parameters and function, aten ops only), so
    that a ``torch.export`` / AOTInductor program of the model calls no op of this package and runs
    without it and without Python (libtorch's AOTI loader, NequIP's ``pair_nequip``). A FusedGate
    whose activation has no aten form (one the kernels do not fuse: its plain path runs) gets back the
    gate it replaced, if it has one. :func:`restore_eager_forms` undoes it. Returns what each module
    became, by name. ``mmea-tp`` adapters have no aten form (an error; nothing is changed then). Forms
    already in ``model`` (an earlier call of either kind, ``torch.jit.script(model)``) are made afresh.

    ``kernels="cpp"``: MMEA adapters on e3nn linears become instead :class:`ScriptableMMEAFusedLinear`,
    one op of this package's C++ extension (``mmea_kernels_ext::mmea_linear``; through ``make_fx``,
    as ``nequip-compile`` traces forces, its forward and backward kernels), which is registered in C++:
    the program runs without Python where ``mmea_kernels._C`` or the LAMMPS plugins' ``mmea_ops.so``
    is loaded first, and is refused where neither is. Other adapters and the FusedGates get their aten
    forms, as with ``"aten"``. Needs the built extension (an error otherwise)."""
    from .fused_gate import FusedGate
    from .gate_swap import _retarget_state

    if kernels not in KERNELS:
        raise ValueError(f"export_forms: kernels={kernels!r}: expected one of {KERNELS}")
    who = "aten_forms" if kernels == "aten" else f"export_forms(kernels={kernels!r})"
    if isinstance(model, FusedGate) or hasattr(model, "adapter_enabled"):
        raise ValueError(f"{who} replaces modules inside a model; for one adapter or FusedGate use its "
                         "__prepare_scriptable__()")
    done: Dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        undone = _restore_eager_forms(model)  # forms of an earlier call or torch.jit.script: made afresh
        try:
            todo = _to_replace(model, who)
            stack.enter_context(script_kernels(kernels, model if kernels == "cpp" else None))  # cpp: is it built
        except (NotImplementedError, RuntimeError):
            for parent, name, form in undone:  # refused: the model as it was
                parent._modules[name] = form
            raise
        for parent, name, full, child, kind in todo:
            if kind == "adapter":
                form = scriptable_adapter(child)
            elif child.fused:
                form = child.__prepare_scriptable__()
            elif child.__dict__.get("_original") is not None:
                form = child.__dict__["_original"]
                _retarget_state(form, child)  # as restore_gates: the gate gets the tensors the FusedGate holds
            else:
                done[full] = "FusedGate (kept: its plain path; activation not fused)"
                continue
            parent._modules[name] = form
            done[full] = type(form).__name__
    return done


def _to_replace(model: nn.Module, who: str) -> list:
    """(parent, name, full name, module, kind) of every adapter and FusedGate, after checking that each
    adapter has a form (an error naming ``who`` and the module, before anything is replaced)."""
    from .fused_gate import FusedGate

    todo = []
    for parent_name, parent in model.named_modules():
        for name, child in list(parent._modules.items()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, FusedGate):
                todo.append((parent, name, full, child, "gate"))
            elif hasattr(child, "adapter_enabled") and hasattr(child, "method"):
                if not hasattr(child, "view"):  # MMEATensorProduct
                    raise NotImplementedError(f"{who}: {full} ({type(child).__name__}, the mmea-tp method) has no "
                                              "aten form; its gate runs this package's ops")
                try:
                    check_scriptable(child, full)
                except NotImplementedError as exc:
                    raise NotImplementedError(f"{who}: {exc}") from None
                todo.append((parent, name, full, child, "adapter"))
    return todo


class _NequIPModifiers:
    @classmethod
    def mmea_kernels_aten_only(cls, model):
        """NequIP model modifier (``nequip-compile ... --modifiers mmea_kernels_aten_only``): the adapters
        and FusedGates as aten ops (:func:`aten_forms`), so that the compiled file runs without
        mmea_kernels and without Python (LAMMPS' ``pair_nequip``). Same numbers; the kernels of this
        package are not used."""
        aten_forms(model)
        return model

    @classmethod
    def mmea_kernels_cpp_ops(cls, model):
        """NequIP model modifier (``nequip-compile ... --modifiers mmea_kernels_cpp_ops``): MMEA adapters
        on e3nn linears as this package's C++ op (:func:`export_forms` with ``kernels="cpp"``), the rest
        as aten ops. The compiled file runs without Python where the op library is loaded first
        (``pair_nequip``: ``LD_PRELOAD`` the LAMMPS plugins' ``mmea_ops.so``; NequIP's Python loader
        imports mmea_kernels, as the file's metadata asks)."""
        export_forms(model, "cpp")
        return model


# NequIP's @model_modifier(persistent=False, private=False, supported_compile_modes=[...]) written out
# (nequip is optional here); one bound method object on every class that offers it, because NequIP
# asserts that modifiers of one name found on several modules are equal
for _fn, _devices in ((_NequIPModifiers.mmea_kernels_aten_only.__func__, []),
                     (_NequIPModifiers.mmea_kernels_cpp_ops.__func__, ["cuda"])):  # the C++ op: CPU kernels
    for _attr, _value in (("persistent", False), ("private", False), ("unsupported_devices", _devices),
                          ("supported_compile_modes", ["torchscript", "aotinductor"])):
        setattr(_fn, f"_nequip_model_modifier_is_{_attr}" if _attr in ("persistent", "private")
                else f"_nequip_model_modifier_{_attr}", _value)
NEQUIP_ATEN_MODIFIER = _NequIPModifiers.mmea_kernels_aten_only
NEQUIP_CPP_MODIFIER = _NequIPModifiers.mmea_kernels_cpp_ops
