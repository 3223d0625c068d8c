"""A model with MMEA adapters and FusedGate saved as a ``torch.export`` program loads and runs in a
new process that imported mmea_kernels, or the libraries its modules name in
``_nequip_custom_ops_libs`` (what NequIP's AOTInductor loader imports before loading a compiled
model; NequIP review 2026-12-03: the fused linear's ops were registered only at its first call, so
such a file failed to load even after ``import mmea_kernels``)."""
import subprocess
import sys

import torch
from e3nn import nn as enn
from e3nn import o3

import mmea_kernels as mk

from helpers import REPO


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = o3.Linear("4x0e+2x1o", "6x0e+2x1o")
        self.g = enn.Gate("4x0e", [torch.nn.functional.silu], "2x0e", [torch.sigmoid], "2x1o")
        self.l2 = o3.Linear("4x0e+2x1o", "3x0e+2x1o")

    def forward(self, x):
        return self.l2(self.g(self.l1(x)))


LOAD = """
import importlib, sys, torch
for lib in sys.argv[2].split():
    importlib.import_module(lib)
ep = torch.export.load(sys.argv[1] + "/m.pt2")
x, want = torch.load(sys.argv[1] + "/ref.pt")
print("max diff", float((ep.module()(x) - want).abs().max()))
"""


def test_exported_program_with_the_package_ops_loads_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    model = Net().double()
    mk.inject_adapters(model, method="mmea", rank=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    mk.replace_gates(model)
    x = torch.randn(5, 10, dtype=torch.float64)
    ep = torch.export.export(model, (x,))
    ops = {str(n.target).split(".")[1] for n in ep.graph.nodes
           if n.op == "call_function" and str(n.target).startswith("mmea_kernels.")}
    assert "fused_gate" in ops and ops & {"gated_linear", "gated_linear_u"}, ops  # the program calls our ops
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save((x, model(x).detach()), tmp_path / "ref.pt")
    libs = sorted({lib for m in model.modules() for lib in getattr(m, "_nequip_custom_ops_libs", ())})
    assert libs == ["mmea_kernels"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for imports, ok in ((" ".join(libs), True), ("", False)):
        res = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path), imports], capture_output=True, text=True,
                             timeout=300, env=env)
        if ok:
            assert res.returncode == 0, res.stderr[-3000:]
            assert float(res.stdout.split("max diff")[1]) <= 1e-12
        else:  # the control: without them the program names the op it cannot find
            assert res.returncode != 0 and "mmea_kernels" in res.stderr
