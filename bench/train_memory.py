"""Memory of fine-tuning: what one force-training step allocates with MMEA, ELoRA and full
fine-tuning of the same MACE, and what energy + forces inference allocates, on CPU or CUDA.

A step is what the fine-tuning loop runs: gradients set to None, energy and forces with a graph
(forces are -dE/dr, so the loss's backward differentiates twice), the loss's backward, one Adam step.
Each model first runs one step, so Adam's states exist; the measured step then reports

* ``peak_MB``: the largest amount of memory held at any moment of the step beyond what was held
  when it started (activations, the force graph, gradients, the optimiser's temporaries);
* ``state_MB``: what training keeps between steps besides the model's weights: the trainable
  parameters' gradients and Adam's two moments (3 copies of the trainable weights);
* ``trainable``: the number of trainable parameters.

On CUDA memory is torch's caching allocator's (``max_memory_allocated``); on CPU every allocation
torch makes is recorded by ``torch.profiler`` (``profile_memory``) and the peak is the running sum's
maximum. Allocations that libraries make behind torch's back (oneDNN or MKL scratch) are not seen.
Allocation sizes do not drift as timings do: each step is measured ``--repeats`` times and every
value is kept.

    python bench/train_memory.py                                  # CPU, MACE-OFF23-medium, 4 aspirin
    python bench/train_memory.py --device cuda --frames 64 --out $OUT
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from model_overhead import append_rows, build, default_molecule, energy_forces, machine_label  # noqa: E402
from provenance import provenance  # noqa: E402

MB = 2.0 ** 20


def peak_bytes(fn, device) -> int:
    """The most bytes ``fn()`` holds at any moment beyond what was held when it was called (what it
    returns is dropped first: only its peak counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts, profile_memory=True, record_shapes=False) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return int(max(itertools.accumulate((b for _, b in events), initial=0)))


def make_step(model, batch, lr: float = 1e-3):
    """One fine-tuning step of ``model`` (its trainable parameters) and the optimiser it steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)  # the caller has done it already (see measure)
        e, f = energy_forces(model, batch, training=True)
        n = batch["ptr"][1:] - batch["ptr"][:-1]
        loss = ((e / n) ** 2).mean() + 100.0 * (f ** 2).mean()
        loss.backward()
        opt.step()

    return step, params


def measure(models: dict, batch, device, repeats: int) -> list:
    rows = []
    for name, model in models.items():
        if name == "frozen":
            def infer():
                energy_forces(model, batch, training=False)
            peaks = [peak_bytes(infer, device) for _ in range(repeats)]
            rows.append({"what": "energy+forces inference", "model": name, "peak_MB": [p / MB for p in peaks],
                         "trainable": 0, "state_MB": 0.0})
            continue
        step, params = make_step(model, batch)
        step()  # Adam's moments exist before the measured steps

        def measured():
            # last step's gradients are freed before the measurement: on CPU the profiler does not see a
            # block allocated before it started being freed, which would count them twice
            for p in params:
                p.grad = None
            return peak_bytes(step, device)
        peaks = [measured() for _ in range(repeats)]
        n = sum(p.numel() for p in params)
        size = params[0].element_size() if params else 0
        rows.append({"what": "force-training step (E+F loss, backward, Adam)", "model": name,
                     "peak_MB": [p / MB for p in peaks], "trainable": n, "state_MB": 3 * n * size / MB})
    return rows


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mace-off23-medium")
    ap.add_argument("--molecule", default=None, help="an rMD17 molecule or a built-in geometry (as model_overhead.py)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory for the JSON row file")
    args = ap.parse_args(argv)
    args.compile, args.split_slices = None, False
    if args.molecule is None:
        args.molecule = default_molecule(args.data_dir)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    base, mmea, elora, batch = build(args, device, getattr(torch, args.dtype))
    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)
    rows = measure({"frozen": base, "mmea": mmea, "elora": elora, "full": full}, batch, device, args.repeats)
    size = f"{args.preset} {args.frames}x {args.molecule} {args.dtype} rank {args.rank}"
    where, stamp, prov = machine_label(device), datetime.datetime.now().isoformat(timespec="seconds"), provenance()
    for r in rows:
        r.update({"size": size, "device": where, "torch": torch.__version__, "date": stamp, **prov})
        print(f"{r['model']:<7} {r['what']:<48} peak {max(r['peak_MB']):9.1f} MB (runs: "
              f"{', '.join(f'{v:.1f}' for v in r['peak_MB'])}); trainable {r['trainable']:>9,}, kept between "
              f"steps {r['state_MB']:7.2f} MB  [{size}, {where}]", flush=True)
    if args.out:
        append_rows(args.out, "train-memory", device, rows)
    return rows


if __name__ == "__main__":
    main()
