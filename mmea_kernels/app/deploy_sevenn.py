"""``mmea-kernels export --format sevenn-checkpoint``: a fine-tuned SevenNet as a checkpoint of
sevenn's own format, for every sevenn tool that reads one (``SevenNetCalculator(path)``, with
``enable_cueq`` / ``enable_flash`` on a GPU; ``sevenn_get_model`` and sevenn's LAMMPS deploy;
``sevenn_inference``; sevenn's own training as a starting point).

A sevenn checkpoint is a config and the state dict of a plain SevenNet, rebuilt by sevenn and
loaded strictly, so only methods whose result is a plain SevenNet export this way: ``full``, and
``elora`` (its adapters merged into their weights). MMEA adapters have no weight-space form: those
checkpoints are refused, pointing to SevenNet's LAMMPS formats and to
:func:`~mmea_kernels.integrations.sevenn.to_sevennet`. The re-fitted per-element reference energies
are added to sevenn's per-species energy shift (they live outside SevenNet's network), and the config's
``version`` is set to the installed sevenn's: with SevenNet-0's ``0.9.1`` sevenn would re-sort the
radial-MLP weights as for a pre-0.9.3 file on load (1.5 eV off on ethanol, found by a review).

Checked before the file takes the name: the dict is unpickled from memory, built by sevenn's
``SevenNetCheckpoint.build_model`` as a path would be, and run by ``SevenNetCalculator`` on the
reference frame and on a periodic copy where atoms see their images (energy, forces, virial)
against the checkpoint's eager model (float32: 2e-5 relative).
"""
from __future__ import annotations

import pathlib
from unittest import mock

import torch

from .deploy import TOLERANCE, _cluster, _crowded, _eager_frames, _fold_parametrizations, _rel_diff
from .deploy_pickle import write_checked_pickle

FORMAT = "sevenn-checkpoint"


def _refuse_adapters(net, method: str) -> list:
    """The adapters to merge; raises for what a plain SevenNet cannot hold."""
    from ..peft.inject import adapted_modules, tensor_product_gates

    mods = adapted_modules(net)
    kept = [n for n, m in mods.items() if not m.mergeable] + list(tensor_product_gates(net))
    if kept:
        raise ValueError(f"--format {FORMAT} writes a plain SevenNet (a sevenn checkpoint holds no adapters); method "
                         f"{method} keeps MMEA gates ({kept[0]}, {len(kept)} in all), which have no weight-space form: "
                         "export it as --format lammps or lammps-parallel (SevenNet's pair styles), or give sevenn's "
                         "calculator mmea_kernels.integrations.sevenn.to_sevennet(model)")
    return list(mods)


def _plain_state(plain: torch.nn.Module, reference: torch.nn.Module, base: str) -> dict:
    """``plain``'s state dict with exactly the keys of sevenn's own build of the base model (a deep
    copy of e3nn's generated code adds ``_tensor_constant`` entries sevenn's strict load refuses)."""
    state, want = plain.state_dict(), reference.state_dict()
    extra = [k for k in state if k not in want and "_tensor_constant" not in k.rsplit(".", 1)[-1]]
    missing = [k for k in want if k not in state]
    if extra or missing:
        raise ValueError(f"the fine-tuned SevenNet does not have the state dict of sevenn's build of {base} "
                         f"({'extra: ' + extra[0] if extra else 'missing: ' + missing[0]}, {len(extra) + len(missing)} "
                         "keys in all): it cannot be written as a sevenn checkpoint")
    return {k: state[k].detach().clone() for k in want}


def _sevenn_results(model, frames):
    """``(energy, forces, virial or None)`` of sevenn's calculator on ``model``, as :func:`_eager_frames`."""
    from sevenn.calculator import SevenNetCalculator

    calc = SevenNetCalculator(model=model, file_type="model_instance", device="cpu")
    out = []
    for atoms, _ in frames:
        a = atoms.copy()
        a.calc = calc
        virial = (torch.tensor(-a.get_stress(voigt=False) * a.get_volume(), dtype=torch.float64)
                  if a.pbc.all() else None)
        out.append((torch.tensor(a.get_potential_energy(), dtype=torch.float64),
                    torch.tensor(a.get_forces(), dtype=torch.float64), virial))
    return out


def export_sevenn_checkpoint(net, ckpt: dict, out: pathlib.Path, trust_pickle: bool = False) -> dict:
    """Write the fine-tuned SevenNet ``net`` to ``out`` as a sevenn checkpoint (checked; see the module)."""
    import warnings

    import sevenn
    from sevenn import checkpoint as sevenn_checkpoint

    from ..integrations.sevenn import _checkpoint_path, to_sevennet
    from ..nn.gate_swap import restore_gates
    from ..peft.inject import merge_and_unload
    from ..train.foundation import model_info

    merged = _refuse_adapters(net, ckpt["method"])
    base = str(ckpt["model"]).split(":", 1)[-1]
    net = net.to(torch.float32).eval()
    z, r_max = model_info(net)
    probe = ckpt.get("probe") or _cluster(z)
    reference = _eager_frames(net, [probe, _crowded(probe, r_max)])
    folded = _fold_parametrizations(net)
    if merged:
        merge_and_unload(net)
    plain = to_sevennet(net)
    restore_gates(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sevenn: no tensor-product accelerator, TorchScript deprecations
        cp = sevenn_checkpoint.SevenNetCheckpoint(_checkpoint_path(base, trust_pickle))
        data = cp.get_checkpoint_dict()
        data.update(model_state_dict=_plain_state(plain, cp.build_model(), base), optimizer_state_dict={},
                    scheduler_state_dict={})
        data["config"] = dict(data["config"], version=sevenn.__version__)
    def difference(loaded):
        with warnings.catch_warnings(), mock.patch.object(sevenn_checkpoint, "torch_load", lambda *a, **k: loaded):
            warnings.simplefilter("ignore")  # sevenn's own loading of a checkpoint, from these bytes
            rebuilt = sevenn_checkpoint.SevenNetCheckpoint(str(out)).build_model()
        got = _sevenn_results(rebuilt, reference)
        return max(_rel_diff(g, w, torch.float32) for g, (_, w) in zip(got, reference))

    rel, _ = write_checked_pickle(out, data, FORMAT, TOLERANCE[torch.float32][0], difference)
    return {"out": str(out), "format": FORMAT, "dtype": "float32", "method": ckpt["method"], "base_model": ckpt["model"],
            "atomic_numbers": [int(v) for v in z], "r_max": float(r_max), "merged_adapters": len(merged),
            "folded_parametrizations": folded, "sevenn_version": sevenn.__version__, "verified_max_rel_diff": rel,
            "sevenn": f"SevenNetCalculator('{out}') (enable_cueq=True on a GPU), sevenn_get_model {out}, "
                      f"sevenn_inference {out} ...; a plain SevenNet: mmea_kernels is not needed to load it"}
