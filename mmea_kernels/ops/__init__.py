"""Gate operations: ``gate_mul`` and ``seg_dot`` with interchangeable backends."""
from .backends import BACKENDS, backend_status, resolve_backend
from .gate.function import gate_mul, seg_dot
from .tables import LayoutTables, layout_tables

__all__ = ["gate_mul", "seg_dot", "BACKENDS", "backend_status", "resolve_backend", "LayoutTables", "layout_tables"]
