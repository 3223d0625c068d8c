"""Paired timing of ``split_tp_slices`` (one split per sliced tensor in e3nn's generated
tensor-product / linear code) against e3nn's own code, whole models, in one process.

    python bench/tp_slices_speed.py                       # SevenNet-0 and MACE-OFF23-medium, 4 aspirin, 1 thread, float32
    python bench/tp_slices_speed.py --models mace-off23-medium --rounds 3 --frames 1 --out -

Cases per model: energy + forces (inference) and a force-training step (E and F with
``create_graph``, a loss on both, its gradient with respect to the trainable parameters) of the
MMEA-adapted model (rank 16, adapters trainable, base frozen; what ``finetune`` runs). Both sides
are the same model (deep copies), one rewritten; before timing, their energies, forces and
gradients are checked to be bitwise equal. Every round times both back to back, order
alternating; the row gives the median of the paired ratios ``e3nn / split`` (> 1: the rewrite is
faster) with its interquartile range.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from gate_speed import _frames, _loss_grads, paired, raw_row, summary  # noqa: E402
from provenance import cpu_model, provenance  # noqa: E402


def _model(name, dtype):
    import mmea_kernels as mk
    from mmea_kernels.train.foundation import load_model

    spec = "sevenn:7net-0" if name == "sevenn" else f"preset:{name}"
    m = load_model(spec, dtype=dtype, split_slices=False)
    mk.inject_adapters(m, mk.AdapterConfig("mmea", rank=16))
    return m


def bench_model(name, args, lines, rows, notes):
    from mmea_kernels.integrations.mace import atoms_to_batch
    from mmea_kernels.nn.tp_slices import split_tp_slices
    from mmea_kernels.train.foundation import model_info

    dtype = getattr(torch, args.dtype)
    plain = _model(name, dtype)
    fast = copy.deepcopy(plain)
    changed = split_tp_slices(fast)
    if args.baseline == "slices-only":  # the rewrite without its cats: what the cats add
        split_tp_slices(plain, cats=False)
    frames, what = _frames(args.frames)
    z, r_max = model_info(plain)
    batch = atoms_to_batch(frames, z, r_max, dtype=dtype)
    def checked(m):  # energies, forces and the training step's gradients
        out = m(dict(batch), training=False, compute_force=True)
        return [out["energy"], out["forces"], *_loss_grads(m, batch)]

    for a, b in zip(checked(plain), checked(fast)):
        assert torch.equal(a, b), f"{name}: the rewritten model differs"
    notes.append(f"{name}: {changed} e3nn modules rewritten; {what}, {sum(len(a) for a in frames)} atoms; "
                 "energies, forces and training gradients bitwise equal")

    def infer(m):
        return lambda: m(dict(batch), training=False, compute_force=True)

    for case, make in (("energy+forces", infer), ("force-training step", lambda m: lambda: _loss_grads(m, batch))):
        ta, tb, ratios = paired(make(plain), make(fast), args.rounds, torch.device("cpu"))
        label = f"{name} {case} {args.dtype}"
        lines.append(summary(label, ta, tb, ratios))
        rows.append(raw_row(label, ta, tb, ratios))
        print(lines[-1], flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sevenn,mace-off23-medium", help="sevenn and/or preset names, comma-separated")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", default=None, help="output file ('-': stdout only); default bench/results/")
    p.add_argument("--baseline", default="e3nn", choices=["e3nn", "slices-only"],
                   help="e3nn's own code (default), or split_tp_slices(cats=False): the slices rewritten, not the cat")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    when = datetime.datetime.now(datetime.timezone.utc)
    prov = provenance()
    base = "e3nn's generated code" if args.baseline == "e3nn" else "split_tp_slices(cats=False)"
    lines = [f"# split_tp_slices vs {base}, {when:%Y-%m-%d %H:%M} UTC",
             f"machine: {cpu_model()}; torch {torch.__version__}; threads {args.threads}; commit {prov['git_commit']}", "",
             f"| case | {args.baseline} ms | split ms | speed-up (median of paired ratios) | IQR | rounds |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows, notes = [], []
    for name in args.models.split(","):
        bench_model(name, args, lines, rows, notes)
    lines += [""] + notes
    print("\n".join(notes))
    if args.out != "-":
        tag = "" if args.baseline == "e3nn" else "-vs-slices-only"
        out = pathlib.Path(args.out) if args.out else HERE / "results" / f"tp-slices-cpu{tag}-{when:%Y-%m-%dT%H%M}.txt"
        out.write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps({"meta": prov, "rows": rows}, indent=1))
        print(f"written to {out}")


if __name__ == "__main__":
    main()
