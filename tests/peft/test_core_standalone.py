"""The library core (layout, linear_spec, ops, nn, peft) stands alone: with ASE, mace-torch,
sevenn, matplotlib and cuEquivariance unimportable, it imports and adapts an e3nn model
(inject, forward and backward, save/load adapter weights, merge, FusedGate)."""
import subprocess
import sys
import textwrap

BLOCKED = ("ase", "mace", "sevenn", "matplotlib", "cuequivariance", "cuequivariance_torch")

SCRIPT = textwrap.dedent('''
    import importlib.abc, sys
    BLOCKED = %r

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    import torch
    from e3nn import nn as enn, o3
    import mmea_kernels as mk

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1 = o3.Linear("8x0e+4x1o", "8x0e+4x1o")
            self.gate = enn.Gate("4x0e", [torch.nn.functional.silu], "4x0e", [torch.sigmoid], "4x1o")
            self.lin2 = o3.Linear("4x0e+4x1o", "2x0e+2x1o")

        def forward(self, x):
            return self.lin2(self.gate(self.lin1(x)))

    torch.manual_seed(0)
    x = torch.randn(5, 20, dtype=torch.float64)
    for method in ("mmea", "elora"):
        net = Net().double()
        ref = net(x)
        rep = mk.inject_adapters(net, mk.AdapterConfig(method, rank=4))
        assert len(rep.modules) == 2, rep
        assert torch.allclose(net(x), ref, rtol=0, atol=1e-12)  # identity at initialisation
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        y = net(x)
        y.square().sum().backward()
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
        state = mk.adapter_state_dict(net)
        other = Net().double()
        other.load_state_dict({k: v for k, v in net.state_dict().items() if ".base." not in k and "mmea_" not in k
                               and "elora_" not in k} | {k.replace(".base.", "."): v for k, v in net.state_dict().items()
                                                         if ".base." in k})
        mk.load_adapter_state_dict(other, state)
        assert torch.equal(other(x), y)
        if method == "elora":
            merged = mk.merge_and_unload(net)
            assert torch.allclose(merged(x), y, rtol=0, atol=1e-12)
    net = Net().double()
    ref = net(x)
    rep = mk.replace_gates(net)
    assert len(rep) == 1 and isinstance(net.gate, mk.FusedGate), str(rep)
    assert torch.allclose(net(x), ref, rtol=0, atol=1e-12)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("core ok")
''') % (BLOCKED,)


def test_core_imports_and_adapts_without_the_application_libraries():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
