"""``mmea-kernels export --format mace-model``: a fine-tuned MACE as mace-torch's own model file.

mace-torch's tools take a MACE pickled whole with ``torch.save`` (what ``mace_run_train`` writes as
``<name>.model``): ``MACECalculator(model_paths=...)``, ``mace_eval_configs --model``,
``mace_create_lammps_model``. A fine-tuning checkpoint of this package holds weights only, so those
tools cannot read it; this format writes the fine-tuned model in their form.

* ELoRA adapters are merged into their base weights (exact up to rounding) and removed, and the
  low-rank parametrizations of ``mmea-paper`` are folded into their weights: what remains is a plain
  mace-torch MACE wherever the method allows it (``full``, ``readout``, ``elora``).
* MMEA adapters (``mmea``, ``mmea-paper``, ``mmea-tp``) have no weight-space form and stay in the
  model as this package's modules: the process that loads the file must be able to import
  ``mmea_kernels`` (the summary's ``imports`` lists every package the file names; so does a
  multi-head model, whose file keeps the hook that runs the head it was fine-tuned for). Loaded there,
  mace-torch's cuEquivariance conversion (``enable_cueq=True``) carries the adapters over
  (:mod:`mmea_kernels.integrations.mace_convert_guard`).

The pickle is made and checked in memory (loaded back and run on the checkpoint's reference frame
and on a periodic copy where atoms see their images, against the checkpoint's model: float64 1e-9
relative, float32 2e-5) before the file takes the name. Like every pickled model, the file runs code
when it is loaded: hand it only to people who trust you (this package loads a pickled model only
with ``--trust-pickle``).
"""
from __future__ import annotations

import io
import pathlib

import torch

from .deploy import TOLERANCE, _cluster, _crowded, _eager_frames, _fold_parametrizations, _rel_diff
from .deploy_pickle import write_checked_pickle

FORMAT = "mace-model"


def _imports(data: bytes) -> list:
    """The top-level packages whose classes or functions the pickle names (what loading it imports):
    its globals, and mmea_kernels wherever it is named (e3nn pickles its generated graphs inside the
    pickle, as source code that imports what the graph calls; torch.save does not compress)."""
    names = {n.split(".")[0] for n in torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))}
    return sorted(names | ({"mmea_kernels"} if b"mmea_kernels" in data else set()))


def export_mace_model(net, ckpt: dict, out: pathlib.Path, dtype: torch.dtype) -> dict:
    """Write the fine-tuned MACE ``net`` to ``out`` as a ``torch.save`` pickle (checked; see the module)."""
    from ..integrations.heads import head_summary
    from ..nn.tp_slices import plain_cats
    from ..peft import adapted_modules, merge_and_unload
    from ..train.foundation import model_info

    net = net.to(dtype).eval()
    z, r_max = model_info(net)
    probe = ckpt.get("probe") or _cluster(z)
    frames = [probe, _crowded(probe, r_max)]
    reference = _eager_frames(net, frames)  # the checkpoint's model, before anything is folded or merged
    folded = _fold_parametrizations(net)
    plain_cats(net)  # e3nn's graphs as e3nn makes them: they name no function of this package
    mods = adapted_modules(net)
    merged = 0
    if mods and all(m.mergeable for m in mods.values()):
        merged = len(mods)
        merge_and_unload(net)
    def difference(loaded):
        return max(_rel_diff(g, w, dtype) for (_, g), (_, w) in zip(_eager_frames(loaded, frames), reference))

    rel, raw = write_checked_pickle(out, net, FORMAT, TOLERANCE[dtype][0], difference)
    imports = _imports(raw)
    kept = len(adapted_modules(net))
    return {"out": str(out), "format": FORMAT, "dtype": str(dtype).replace("torch.", ""), "method": ckpt["method"],
            "base_model": ckpt["model"], "atomic_numbers": [int(v) for v in z], "r_max": float(r_max),
            "folded_parametrizations": folded, "merged_adapters": merged, "adapters_kept": kept,
            "verified_max_rel_diff": rel, "imports": imports, **head_summary(net, FORMAT),
            "mace": f"MACECalculator(model_paths='{out}', default_dtype='{str(dtype).replace('torch.', '')}'), "
                    f"mace_eval_configs --model {out}, mace_create_lammps_model {out}"
                    + ("; mmea_kernels must be importable where it is loaded (the file holds its adapter modules)"
                       if "mmea_kernels" in imports else "; a plain mace-torch model: mmea_kernels is not needed")}

