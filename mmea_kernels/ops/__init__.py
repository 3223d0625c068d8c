"""Gate operations: ``gate_mul`` and ``seg_dot`` with interchangeable backends.

Importing this package registers every custom op of mmea_kernels (``torch.ops.mmea_kernels.*``: the
gate ops, FusedGate's and the fused linear + gate's), so that a program saved with them
(``torch.export``, AOTInductor, NequIP's ``nequip-compile``) loads in any process that imported
mmea_kernels."""
from .backends import BACKENDS, backend_status, resolve_backend
from .gate.function import gate_mul, seg_dot
from .tables import LayoutTables, layout_tables
from .fused_gate import function as _fused_gate_ops  # noqa: F401,E402 - op registration (see above)
from .gated_linear import function as _gated_linear_ops  # noqa: F401,E402 - op registration (see above)

__all__ = ["gate_mul", "seg_dot", "BACKENDS", "backend_status", "resolve_backend", "LayoutTables", "layout_tables"]
