"""A NequIP model with MMEA adapters and FusedGate, compiled by NequIP's own ``nequip-compile``
(AOTInductor, CPU, target ``pair_nequip``: LAMMPS' inputs and outputs), then run without Python, as
LAMMPS' ``pair_nequip`` runs it: a small C++ program on libtorch's ``AOTIModelPackageLoader``.

- ``--modifiers mmea_kernels_aten_only`` (:func:`mmea_kernels.aten_forms`): the file must load and give
  the eager model's per-atom energies, forces and virial (float64);
- ``--modifiers mmea_kernels_cpp_ops`` (``export_forms(model, "cpp")``: MMEA adapters as this package's
  C++-registered op): the same, with the kernels' library ``mmea_ops.so`` (csrc/ compiled without Python,
  as ``mmea-kernels lammps-build`` builds it; built here) loaded first; without it, refused;
- the control, compiled without modifiers: the file calls this package's Python custom ops and the C++
  loader must refuse it, naming them;
- cost: the three files in Python (NequIP's AOTInductor loader; the ops come from ``import mmea_kernels``),
  energy+forces+virial per call, alternating rounds (the order flips every round), the median of the
  per-round ratios aten-only / package ops and C++ ops / package ops, and their quartiles; and the two
  Python-free files against each other in one C++ loader process (aten-only / cpp ops), as LAMMPS runs them.

The model (``--layers``, ``--features``, l_max 2, float64, random adapter weights) is built in this
process; ``nequip-compile``'s ``main`` runs on it in-process (its loader is handed this model instead
of reading a checkpoint: everything after loading, modifiers and metadata included, is NequIP's).

    python bench/nequip_aoti.py                       # ~9 min on 2 cores (three AOTInductor builds)
    python bench/nequip_aoti.py --rounds 40 --threads 2

Needs nequip (scripts/install.sh installs it), g++ and torch's C++ headers. Writes
``bench/results/nequip-aoti-cpu-DATE.{json,txt}`` (``--out``)."""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from lammps_sevenn import molecular_box  # noqa: E402
from provenance import cpu_model, provenance  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
INPUTS = ["pos", "edge_index", "atom_types", "cell", "edge_cell_shift"]
OUTPUTS = ["atomic_energy", "forces", "virial"]  # nequip's LMP_OUTPUTS, in the file's order
TYPES = ["H", "C", "O"]

LOADER_CPP = r"""
// libtorch only, no Python: what pair_nequip does with a .nequip.pt2 file.
//   loader FILE.pt2 INPUTS.pt OUT.pt KEYS...                 run once, write the outputs
//   loader --time A.pt2 B.pt2 INPUTS.pt ROUNDS CALLS KEYS...  seconds per call of A and B, per round,
//                                                            the order flipping every round
#include <torch/torch.h>
#include <torch/script.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <chrono>
#include <dlfcn.h>
#include <cstdlib>
#include <fstream>
#include <iostream>
using Loader = torch::inductor::AOTIModelPackageLoader;
static std::vector<at::Tensor> held_inputs(const char* path, int first, int argc, char** argv) {
  auto held = torch::jit::load(path);  // the input tensors, as buffers of a scripted module
  std::vector<at::Tensor> inputs;
  for (int i = first; i < argc; ++i) inputs.push_back(held.attr(argv[i]).toTensor());
  return inputs;
}
static double per_call(Loader& m, const std::vector<at::Tensor>& in, int calls) {
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) m.run(in);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls;
}
int main(int argc, char** argv) {
  if (const char* lib = std::getenv("MMEA_OPS_LIB")) {  // mmea_ops.so: registers mmea_kernels_ext::* (C++)
    if (!dlopen(lib, RTLD_NOW | RTLD_GLOBAL)) { std::cerr << dlerror() << std::endl; return 2; }
  }
  if (std::string(argv[1]) == "--time") {
    Loader a(argv[2], "model"), b(argv[3], "model");
    auto inputs = held_inputs(argv[4], 7, argc, argv);
    const int rounds = std::atoi(argv[5]), calls = std::atoi(argv[6]);
    per_call(a, inputs, calls), per_call(b, inputs, calls);
    for (int r = 0; r < rounds; ++r) {
      double ta, tb;
      if (r % 2) { ta = per_call(a, inputs, calls); tb = per_call(b, inputs, calls); }
      else { tb = per_call(b, inputs, calls); ta = per_call(a, inputs, calls); }
      std::cout << "round " << ta << " " << tb << std::endl;
    }
    return 0;
  }
  Loader loader(argv[1], "model");
  auto out = loader.run(held_inputs(argv[2], 4, argc, argv));
  std::vector<char> bytes = torch::pickle_save(c10::IValue(c10::List<at::Tensor>(out)));
  std::ofstream f(argv[3], std::ios::binary);
  f.write(bytes.data(), bytes.size());
  std::cout << "ran: " << out.size() << " outputs" << std::endl;
  return 0;
}
"""


def build_loader(work: pathlib.Path) -> pathlib.Path:
    """Compile the C++ loader against this torch's libtorch (about 15 s)."""
    tdir = pathlib.Path(torch.__file__).parent
    src, exe = work / "loader.cpp", work / "loader"
    src.write_text(LOADER_CPP)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["g++", "-std=c++17", "-O1", str(src), f"-I{tdir}/include", f"-I{tdir}/include/torch/csrc/api/include",
           f"-L{tdir}/lib", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{tdir}/lib",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-ldl", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def build_ops_lib(work: pathlib.Path) -> pathlib.Path:
    """csrc/*.cpp without Python (-DMMEA_NO_PYTHON), as lammps_plugin/build.sh builds mmea_ops.so (~1.5 min)."""
    tdir = pathlib.Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-std=c++17", "-fPIC", "-w", "-fopenmp", "-DMMEA_NO_PYTHON", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             f"-I{REPO / 'csrc'}", f"-I{tdir}/include", f"-I{tdir}/include/torch/csrc/api/include"]
    objs, procs = [], []
    for src in sorted((REPO / "csrc").glob("*.cpp")):
        objs.append(work / f"mmea_{src.stem}.o")
        procs.append(subprocess.Popen(["g++", *flags, "-c", str(src), "-o", str(objs[-1])], stderr=subprocess.PIPE))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"compiling csrc/ failed:\n{proc.stderr.read().decode()[-3000:]}")
    lib = work / "mmea_ops.so"
    subprocess.run(["g++", "-shared", "-fopenmp", *map(str, objs), "-o", str(lib), f"-L{tdir}/lib", "-ltorch",
                    "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{tdir}/lib"], check=True, capture_output=True, text=True)
    return lib


def nequip_model(layers: int, features: int, seed: int):
    """A float64 NequIP model with FusedGate and MMEA adapters (rank 8), adapter weights N(0, 0.1²)."""
    import mmea_kernels as mk
    from mmea_kernels.integrations.nequip import AdaptedNequIPGNNModel

    model = AdaptedNequIPGNNModel(
        adapter_method="mmea", adapter_rank=8, seed=seed, model_dtype="float64", r_max=5.0, type_names=TYPES,
        num_layers=layers, l_max=2, parity=True, num_features=features, radial_mlp_width=16, avg_num_neighbors=12.0,
        per_type_energy_scales={"H": 0.5, "C": 0.7, "O": 0.9},
        per_type_energy_shifts={"H": -13.0, "C": -1030.0, "O": -2040.0})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert len(mk.adapted_modules(model)) == 2 * layers
    return model


def structure(grid):
    """A periodic box of toluene and ethanol copies as a NequIP data dict with its neighbour list."""
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    from mmea_kernels.app.data import toy_molecules

    atoms = molecular_box(toy_molecules("toluene", 1, seed=1) + toy_molecules("ethanol", 1, seed=2), grid, 7.0)
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=TYPES)
    data = AtomicDataDict.batched_from_list([compute_neighborlist_(mapper(from_ase(atoms)), r_max=5.0)])
    return len(atoms), data


def nequip_compile(model, data, out: pathlib.Path, modifiers) -> float:
    """``nequip-compile <model> out --mode aotinductor --device cpu --target pair_nequip [--modifiers ...]``,
    its loader handed ``model``; seconds taken."""
    from nequip.scripts import compile as nc

    real = nc.load_saved_model
    nc.load_saved_model = lambda *a, **k: (copy.deepcopy(model), copy.deepcopy(data)) \
        if k.get("return_data_dict") else copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        nc.main(["unused.ckpt", str(out), "--mode", "aotinductor", "--device", "cpu", "--target", "pair_nequip"]
                + (["--modifiers", *modifiers] if modifiers else []))
    finally:
        nc.load_saved_model = real
    return time.perf_counter() - t0


def run_loader(exe, pt2, held, out, ops_lib=None) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}  # no Python anywhere in this process
    if ops_lib is not None:
        env["MMEA_OPS_LIB"] = str(ops_lib)
    return subprocess.run([str(exe), str(pt2), str(held), str(out), *INPUTS], capture_output=True, text=True,
                          env=env, timeout=600)


def eager_outputs(model, data):
    out = model({k: (v.clone() if torch.is_tensor(v) else v) for k, v in data.items()})
    return [out[k].detach() for k in OUTPUTS]


def paired(fa, fb, rounds: int, calls: int):
    """Median and quartiles of the per-round time ratios fa / fb, the order flipping every round."""
    def clock(f):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        return (time.perf_counter() - t0) / calls
    for _ in range(2):
        clock(fa), clock(fb)
    ratios, ta, tb = [], [], []
    for r in range(rounds):
        a, b = (clock(fa), clock(fb)) if r % 2 else tuple(reversed((clock(fb), clock(fa))))
        ratios.append(a / b), ta.append(a), tb.append(b)
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "rounds": rounds, "calls_per_round": calls,
            "ms_a": 1e3 * statistics.median(ta), "ms_ops": 1e3 * statistics.median(tb)}


MODIFIERS = {"aten": ["mmea_kernels_aten_only"], "cpp": ["mmea_kernels_cpp_ops"], "ops": []}


def python_free_checks(work, files, data, want, rounds, calls):
    """Each file in the C++ loader: aten-only and cpp (with mmea_ops.so) must give ``want``; the control
    (package ops) and the cpp file without mmea_ops.so must be refused, naming the missing ops. Then
    the aten-only and cpp files timed against each other in one C++ process (paired rounds)."""
    exe, ops_lib = build_loader(work), build_ops_lib(work)

    class Held(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k in INPUTS:
                self.register_buffer(k, data[k].contiguous())

        def forward(self):
            return self.pos
    torch.jit.script(Held()).save(str(work / "inputs.pt"))
    diffs, refusals = {}, {}
    for kind, lib in (("aten", None), ("cpp", ops_lib)):
        res = run_loader(exe, files[kind], work / "inputs.pt", work / f"{kind}_out.pt", lib)
        if res.returncode != 0:
            raise SystemExit(f"the {kind} file did not run without Python:\n{res.stderr[-3000:]}")
        got = torch.load(work / f"{kind}_out.pt", weights_only=False)  # written by our own loader just now
        diffs[kind] = {k: float((g - w).abs().max() / w.abs().max()) for k, g, w in zip(OUTPUTS, got, want)}
    for kind, name in (("ops", "mmea_kernels::"), ("cpp", "mmea_kernels_ext::")):
        res = run_loader(exe, files[kind], work / "inputs.pt", work / "refused.pt")  # no mmea_ops.so
        why = next((ln.strip() for ln in res.stderr.splitlines() if name in ln), res.stderr[-300:])
        refusals[kind] = {"refused": res.returncode != 0 and name in res.stderr, "message": why}
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MMEA_OPS_LIB": str(ops_lib)}
    res = subprocess.run([str(exe), "--time", str(files["aten"]), str(files["cpp"]), str(work / "inputs.pt"),
                          str(rounds), str(calls), *INPUTS], capture_output=True, text=True, env=env, timeout=1200)
    if res.returncode != 0:
        raise SystemExit(f"timing in the C++ loader failed:\n{res.stderr[-3000:]}")
    pairs = [tuple(map(float, ln.split()[1:])) for ln in res.stdout.splitlines() if ln.startswith("round ")]
    ratios = [a / b for a, b in pairs]
    q = statistics.quantiles(ratios, n=4)
    timing = {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "rounds": rounds, "calls_per_round": calls,
              "ms_aten": 1e3 * statistics.median(a for a, _ in pairs),
              "ms_cpp": 1e3 * statistics.median(b for _, b in pairs)}
    return diffs, refusals, timing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--grid", type=int, nargs=3, default=[2, 2, 1], help="molecules per box side")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nequip.utils.global_state import set_global_state

    set_global_state()
    import mmea_kernels  # noqa: F401 (the ops of the control and cpp files, for the timing)
    from nequip.model.inference_models.aotinductor import load_aotinductor_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="nequip-aoti-"))
    try:
        model = nequip_model(args.layers, args.features, args.seed).eval()
        n_atoms, data = structure(args.grid)
        want = eager_outputs(model, data)
        files = {k: work / f"{k}.nequip.pt2" for k in MODIFIERS}
        secs = {k: nequip_compile(model, data, f, MODIFIERS[k]) for k, f in files.items()}
        diffs, refusals, c_timing = python_free_checks(work, files, data, want, args.rounds, args.calls)
        loaded = {k: load_aotinductor_model(str(f), "cpu", input_keys=INPUTS, output_keys=OUTPUTS)[0]
                  for k, f in files.items()}
        inp = {k: data[k] for k in INPUTS}
        timing = {k: paired(lambda k=k: loaded[k](dict(inp)), lambda: loaded["ops"](dict(inp)), args.rounds, args.calls)
                  for k in ("aten", "cpp")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(v <= 1e-12 for d in diffs.values() for v in d.values()) and all(r["refused"] for r in refusals.values())
    result = {"date": datetime.date.today().isoformat(), "machine": cpu_model(), "threads": args.threads,
              "model": f"NequIP float64, {args.layers} layers, {args.features} features, l_max 2, MMEA rank 8 "
                       "on every conv linear, FusedGate", "atoms": n_atoms,
              "compile_s": secs, "python_free_relative_max_diff": diffs, "refusals": refusals,
              "time_ratio_over_ops": timing, "time_ratio_aten_over_cpp_in_cpp_loader": c_timing, "passed": ok,
              "provenance": provenance()}
    text = (f"NequIP AOTInductor (nequip-compile, pair_nequip target), {result['model']}, {n_atoms} atoms, "
            f"{cpu_model()}, {args.threads} thread(s), {result['date']}\n")
    for kind, what in (("aten", "aten-only file (no library)"), ("cpp", "cpp-ops file (mmea_ops.so loaded)")):
        text += (f"  {what} in C++ (no Python) vs eager: relative max diff "
                 + ", ".join(f"{k} {v:.1e}" for k, v in diffs[kind].items()) + "\n")
    for kind, what in (("ops", "control (package ops)"), ("cpp", "cpp-ops file without mmea_ops.so")):
        text += f"  {what} refused by the C++ loader: {refusals[kind]['refused']} ({refusals[kind]['message'][:160]})\n"
    for kind, what in (("aten", "aten-only"), ("cpp", "cpp ops")):
        t = timing[kind]
        text += (f"  per call, {what} / package ops (Python loader): {t['median']:.3f} "
                 f"(IQR {t['q1']:.3f}..{t['q3']:.3f}, {args.rounds} rounds; {t['ms_a']:.2f} vs {t['ms_ops']:.2f} ms)\n")
    text += (f"  per call, aten-only / cpp ops (C++ loader, no Python): {c_timing['median']:.3f} "
             f"(IQR {c_timing['q1']:.3f}..{c_timing['q3']:.3f}, {args.rounds} rounds; {c_timing['ms_aten']:.2f} vs "
             f"{c_timing['ms_cpp']:.2f} ms)\n")
    text += "  compile: " + " / ".join(f"{k} {v:.0f} s" for k, v in secs.items())
    text += f"\n  {'PASSED' if ok else 'FAILED'}\n"
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"nequip-aoti-cpu-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".txt").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
