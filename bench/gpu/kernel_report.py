"""Registers and spills of every Triton kernel of the package, compiled ahead of time for sm_90
(H100/H200) with the tile sizes and flags the launchers use; no GPU needed.

Each kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; its PTX is
assembled by Triton's own ``ptxas -v``, whose report gives registers per thread and spill bytes.
Run it in a process without ``TRITON_INTERPRET`` (the kernels must be decorated for compilation):

    python bench/gpu/kernel_report.py [--out bench/results/kernels-sm90-<date>.txt]
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_report.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmea_kernels.ops.gate import triton as tb  # noqa: E402
from mmea_kernels.ops.gated_linear import triton_kernels as tk  # noqa: E402

PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _ptxas() -> str:
    from triton.backends.nvidia import compiler
    get = getattr(compiler, "get_ptxas", None)  # the ptxas triton itself uses for sm_90 (3.9: ptxas-blackwell)
    if get is not None:
        try:
            return get(90).path
        except TypeError:
            return get().path
    return os.path.join(os.path.dirname(compiler.__file__), "bin", "ptxas")


def compile_report(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 3) -> dict:
    """{"regs", "spill_stores", "spill_loads", "shared"} of ``fn`` compiled for sm_90."""
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as d:
        ptx = pathlib.Path(d) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        res = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", str(pathlib.Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None,
            "shared": getattr(k.metadata, "shared", None)}


def gated_linear_cases():
    """(label, fn, types, constexprs, warps, stages) of the fused linear's kernels, as launched."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        t = tk.GPU_TILES[dtype]
        p = PTR[dtype]
        precs = ("tf32x3", "ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for prec in precs:
            # the forward as training launches it (also storing u, the superset of the inference forward)
            for pre, post, bias, add, u, what in ((False, True, False, True, True, "forward (gate, additive, u)"),
                                                  (True, False, False, False, False, "input gradient (gate prologue)")):
                types = {n: p for n in ("x_ptr", "w_ptr", "b_ptr", "gpre_ptr", "gpost_ptr", "add_ptr", "out_ptr",
                                        "u_ptr")}
                types.update(pw_ptr="*fp64", task_ptr="*i32", ins_ptr="*i32", stride_xd="i32", stride_od="i32")
                cx = dict(HAS_PRE=pre, HAS_POST=post, HAS_BIAS=bias, HAS_ADD=add, ACC=tl.float64 if dtype == torch.float64
                          else tl.float32, DOT=TL[dtype], PREC=prec, BLOCK_M=t["block_m"], BLOCK_K=t["block_k"],
                          BLOCK_W=t["block_w"], HAS_U=u)
                yield (f"gl_fwd {NAMES[dtype]} {prec} {what} m{t['block_m']} w{t['block_w']} k{t['block_k']}",
                       tk._gl_fwd_kernel, types, cx, t["num_warps"], t["num_stages"])
            types = {n: p for n in ("a_ptr", "b_ptr", "gpre_ptr", "gpost_ptr")}
            types.update(pw_ptr="*fp64", out_ptr="*fp64" if dtype == torch.float64 else "*fp32", wtask_ptr="*i32")
            bn = tk.block_n_wgrad(10**6, dtype, False)
            # as a training backward launches it (output gate), and with both gates (higher derivatives)
            for pre, what in ((False, "output gate"), (True, "both gates")):
                cx = dict(HAS_PRE=pre, HAS_POST=True, ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                          DOT=TL[dtype], PREC=prec, BLOCK_N=bn, BLOCK_U=t["block_k"], BLOCK_W=t["block_w"])
                yield (f"gl_wgrad {NAMES[dtype]} {prec} {what} n{bn} u{t['block_k']} w{t['block_w']}",
                       tk._gl_wgrad_kernel, types, cx, t["num_warps"], t["num_stages"])


def gate_cases():
    """gate_mul and seg_dot at the tiles their launchers pick for a MACE-sized layer."""
    d, g, w = 2048, 384, 8  # 128x0e+128x1o+128x2e+128x3o: D, gates, padded gate width (2l+1 <= 7)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        p = PTR[dtype]
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        bn, bd, warps = tb._gate_mul_blocks(32000, d, False)
        yield (f"gate_mul {NAMES[dtype]} n{bn} d{bd}", tb._gate_mul_kernel,
               {"x_ptr": p, "gates_ptr": p, "gate_of_ptr": "*i32", "out_ptr": p, "stride_xd": "i32", "stride_gg": "i32",
                "stride_od": "i32"}, dict(FILL=1.0, ACC=acc, BLOCK_N=bn, BLOCK_D=bd), warps, 3)
        bn, bg, warps = tb._seg_dot_blocks(32000, g, w, False)
        yield (f"seg_dot {NAMES[dtype]} n{bn} g{bg} w{w}", tb._seg_dot_kernel,
               {"a_ptr": p, "b_ptr": p, "cols_ptr": "*i32", "out_ptr": p, "stride_ad": "i32", "stride_bd": "i32",
                "stride_og": "i32"}, dict(SHARED=False, ACC=acc, W=w, K=7, BLOCK_N=bn, BLOCK_G=bg), warps, 3)


def fused_gate_cases():
    """FusedGate's kernels (forward, backward, double backward) at the tiles its launcher picks for SevenNet-0's gate (scalars and gates
    256 columns in, 416 out; gated width 5 -> 8), with SevenNet's activations (silu, sigmoid) and
    with every fused activation compiled in (the worst case)."""
    try:
        from mmea_kernels.ops.fused_gate import triton as fgt
    except ImportError:
        return
    for dtype in (torch.float32, torch.float64):
        p = PTR[dtype]
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        # N, DIN, DOUT: Python ints below 2**31 at launch, which triton specialises as i32
        common = {"cols_ptr": "*i64", "cst_ptr": "*fp64", "N": "i32", "DIN": "i32", "DOUT": "i32"}
        for used, what in ((0b110, "silu+sigmoid"), (0b1111111, "all activations")):
            bn, bd, nw = fgt._blocks(32000, 416, 1, False, dtype == torch.float64)
            yield (f"fused_gate fwd {NAMES[dtype]} {what} n{bn} d{bd}", fgt._fwd_kernel,
                   dict({"x_ptr": p, "y_ptr": p}, **common), dict(USED=used, ACC=acc, BLOCK_N=bn, BLOCK_D=bd), nw, 3)
            bn, bd, nw = fgt._blocks(32000, 544, 8, False)
            yield (f"fused_gate bwd {NAMES[dtype]} {what} n{bn} d{bd}", fgt._bwd_kernel,
                   dict({"x_ptr": p, "dy_ptr": p, "dx_ptr": p, "mem_ptr": "*i64"}, **common),
                   dict(USED=used, ACC=acc, W=8, BLOCK_N=bn, BLOCK_D=bd), nw, 3)
            bn, bd, nw = fgt._blocks(32000, 544, 8, False)  # max(d_in, d_out), as double_backward picks
            yield (f"fused_gate dbwd {NAMES[dtype]} {what} n{bn} d{bd}", fgt._dbwd_kernel,
                   {"x_ptr": p, "dy_ptr": p, "v_ptr": p, "gx_ptr": p, "gdy_ptr": p, "fcols_ptr": "*i64",
                    "fcst_ptr": "*fp64", "bcols_ptr": "*i64", "bcst_ptr": "*fp64", "mem_ptr": "*i64", "N": "i64",
                    "DIN": "i64", "DOUT": "i64"}, dict(USED=used, ACC=acc, W=8, BLOCK_N=bn, BLOCK_D=bd), nw, 3)


def gate_net_cases():
    """The MMEA gate net's kernels (ops/gate_net/triton.py) at a MACE layer's shape (128 0e inputs,
    rank 16, 128 additive + 384 gate columns) and the launcher's GPU tiles; the backward with every
    output (dx0 and the weight-gradient operands)."""
    from mmea_kernels.ops.gate_net import triton as gnt
    from mmea_kernels.ops.gated_linear.triton_kernels import fp32_precision
    bn, bs, bo, warps = gnt._blocks(32000, 128, 512, False)
    for dtype in (torch.float32, torch.float64):
        p = PTR[dtype]
        cx = dict(PHI_EXP=True, ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                  PREC=fp32_precision() if dtype == torch.float32 else "ieee", BLOCK_N=bn, BLOCK_S=bs, R_P=16,
                  BLOCK_O=bo)
        ptrs = ("x_ptr", "wd_ptr", "bd_ptr", "wu_ptr", "bu_ptr", "add_ptr", "g_ptr")
        yield (f"gate_net fwd {NAMES[dtype]} n{bn} s{bs} r16 o{bo}", gnt._gn_fwd_kernel, {n: p for n in ptrs}, cx,
               warps, gnt.NUM_STAGES)
        ptrs = ("x_ptr", "wd_ptr", "bd_ptr", "wu_ptr", "g_ptr", "da_ptr", "dg_ptr", "dx_ptr", "dgam_ptr", "z_ptr",
                "dh_ptr")
        yield (f"gate_net bwd {NAMES[dtype]} n{bn} s{bs} r16 o{bo} (dx0 + weight operands)", gnt._gn_bwd_kernel,
               {n: p for n in ptrs}, dict(cx, HAS_DA=True, HAS_DG=True, NEED_X=True, NEED_W=True), warps,
               gnt.NUM_STAGES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    lines = [f"# Triton kernels compiled for sm_90 (ptxas -v), triton {triton.__version__}, "
             f"{datetime.date.today().isoformat()}",
             f"{'kernel':<72}{'warps':>6}{'stages':>7}{'regs':>6}{'spill st':>10}{'spill ld':>10}{'smem':>8}"]
    bad = 0
    for cases in (gate_cases(), gated_linear_cases(), fused_gate_cases(), gate_net_cases()):
        for label, fn, types, cx, warps, stages in cases:
            try:
                r = compile_report(fn, types, cx, warps, stages)
                lines.append(f"{label:<72}{warps:>6}{stages:>7}{r['regs']!s:>6}{r['spill_stores']!s:>10}"
                             f"{r['spill_loads']!s:>10}{r['shared']!s:>8}")
            except Exception as exc:  # noqa: BLE001 - report and go on
                bad += 1
                lines.append(f"{label:<72} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
