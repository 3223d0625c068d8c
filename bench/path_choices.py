"""What ``MMEA_FUSED_LINEAR=auto`` chooses in a whole MACE, layer by layer, at several system sizes:
for each frame count, one energy+force evaluation of the MMEA-adapted model (the input gradient is
needed, as for forces), then each ``MMEALinear``'s choice with the two per-call times it measured
(fused kernel; base layer then gate kernels). The times are each layer's own (7 alternating rounds
of 2 calls, medians), not a whole-model ratio: ``bench/model_overhead.py`` measures that.

    python bench/path_choices.py                              # CPU, 1 thread, 1/4/16/64 aspirin frames
    python bench/path_choices.py --device cuda --frames 4,64,256 --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_overhead  # noqa: E402 - the same model, frames and adapters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mace-off23-medium")
    ap.add_argument("--molecule", default=None, help="as bench/model_overhead.py (default aspirin, else toluene)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--frames", default="1,4,16,64", help="comma-separated frame counts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory for the JSON file")
    args = ap.parse_args(argv)
    os.environ["MMEA_FUSED_LINEAR"] = "auto"
    from mmea_kernels.nn.path_choice import auto_choices

    if args.molecule is None:
        args.molecule = model_overhead.default_molecule(args.data_dir)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    where = model_overhead.machine_label(device)
    rows = []
    for n in (int(f) for f in args.frames.split(",")):
        build_args = argparse.Namespace(preset=args.preset, molecule=args.molecule, data_dir=args.data_dir,
                                        frames=n, rank=args.rank, compile=None)
        _, mmea, _, batch = model_overhead.build(build_args, device, dtype)
        model_overhead.energy_forces(mmea, batch)
        choices = auto_choices(mmea)
        print(f"{args.preset} {n}x {args.molecule} {args.dtype}, {where}: "
              f"{sum(c['path'] == 'fused' for c in choices)}/{len(choices)} fused")
        for c in choices:
            ratio = f"{c['fused_us'] / c['unfused_us']:.2f}" if c["fused_us"] is not None else c.get("error", "")
            print(f"  {c['layer']:<28} {c['rows']:>6} rows  fused {c['fused_us'] or float('nan'):>10.1f} us  "
                  f"unfused {c['unfused_us']:>10.1f} us  fused/unfused {ratio}")
        rows.append({"size": f"{args.preset} {n}x {args.molecule} {args.dtype}", "frames": n, "device": where,
                     "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "choices": choices})
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "gpu" if device.type == "cuda" else f"cpu-{torch.get_num_threads()}thr"
        path = out / f"path-choices-{tag}-{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(rows, indent=1))
        print(f"written {path}")
    return rows


if __name__ == "__main__":
    main()
