"""``mmea-kernels export``: a fine-tuning checkpoint as a TorchScript file for production MD.

* ``lammps``: mace-torch's deployment (``LAMMPS_MACE`` + e3nn ``jit.compile``, float64 on the CPU),
  the file ``pair_style mace`` loads (:func:`~mmea_kernels.integrations.export.export_lammps`);
* ``lammps-mliap``: mace-torch's ML-IAP deployment (``pair_style mliap unified``, LAMMPS over several
  processes or GPUs; :mod:`~mmea_kernels.app.deploy_mliap`);
* ``torchscript``: the model itself scripted (its forward takes mace-torch's input dict), for
  ``torch.jit.load`` in Python or libtorch;
* ``mace-model``: the model pickled as mace-torch's tools load it (:mod:`~mmea_kernels.app.deploy_mace`).

A SevenNet checkpoint exports as ``lammps`` (``pair_style e3gnn``, float32) or ``lammps-parallel``
(the segment files of ``pair_style e3gnn/parallel``), built as sevenn's deploy builds them with the
adapters, FusedGates and re-fitted E0s inside (:mod:`~mmea_kernels.integrations.sevenn_deploy`) and
checked as ``pair_e3gnn*.cpp`` run them (the parallel files also with ghost atoms); or, without MMEA
adapters, as ``sevenn-checkpoint`` (:mod:`~mmea_kernels.app.deploy_sevenn`).

The TorchScript files need neither mmea_kernels nor mace-torch nor e3nn to load (the pickles, ML-IAP
and mace-model, need mace-torch and, with MMEA adapters, mmea_kernels), except with ``--kernels cpp``
(the adapters as one op of this package's C++ extension, which must then be loaded). Low-rank
parametrizations (``mmea-paper``) are folded into their weights in the exported copy (exact). Before
the file is put at ``out`` it is loaded back and evaluated on the checkpoint's reference frame (one
training frame; for checkpoints from before they held one, a small cluster of its elements), and on
the same atoms in a periodic box (the virials ``pair_style mace`` takes the pressure from); it replaces
nothing unless it gives the eager model's energy, forces and virials (float64: 1e-9 relative, float32:
2e-5; :data:`TOLERANCE`): a wrong or half-written file never takes the name."""
from __future__ import annotations

import os
import pathlib
import re
import stat
import tempfile
from typing import Optional

import torch

from ..integrations.heads import head_summary
from ..linear_spec import is_cuet_linear
from ..nn.gate_swap import replace_gates

__all__ = ["export_checkpoint", "FORMATS"]

FORMATS = ("lammps", "lammps-parallel", "lammps-mliap", "torchscript", "mace-model", "sevenn-checkpoint")
SEVENN_ONLY = ("lammps-parallel", "sevenn-checkpoint")
PARALLEL = "lammps-parallel"  # SevenNet only: a directory of segment files
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _fold_parametrizations(model: torch.nn.Module) -> int:
    """Replace every parametrized tensor by the value its parametrization gives (in place); the count."""
    from torch.nn.utils import parametrize

    n = 0
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            for name in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
                n += 1
    return n


def _is_mace(model) -> bool:
    from mace.modules import MACE

    return isinstance(model, MACE)


_SCRIPT_ERRORS = (RuntimeError, torch.jit.Error, torch.jit.frontend.FrontendError, TypeError, AttributeError)


def _not_scriptable(exc: Exception, fmt: str) -> ValueError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ValueError(f"this model does not script for --format {fmt} ({type(exc).__name__}: {first})")


def _script(model, fmt: str, dtype: torch.dtype, kernels: str = "aten"):
    from ..integrations.export import lammps_model, script_model

    try:
        if fmt == "lammps":
            return lammps_model(model, dtype=dtype, device="cpu", in_place=True, kernels=kernels)
        return script_model(model.to(dtype), in_place=True, kernels=kernels)
    except _SCRIPT_ERRORS as exc:  # NotImplementedError (mmea-tp) is a RuntimeError
        raise _not_scriptable(exc, fmt) from exc


def _check_kernels(kernels: str, fmt: str) -> None:
    from ..nn.scriptable import KERNELS

    if kernels not in KERNELS:
        raise ValueError(f"unknown --kernels {kernels!r}; expected one of {', '.join(KERNELS)}")
    if kernels == "cpp" and fmt not in ("lammps", "torchscript", PARALLEL):
        raise ValueError(f"--kernels cpp is for --format lammps, {PARALLEL} or torchscript, not --format {fmt}")
    if kernels == "cpp":
        from ..ops.gated_linear.cpp_kernels import cpp_status

        ok, why = cpp_status("cpu")
        if not ok:
            raise ValueError(f"--kernels cpp needs this package's C++ extension: {why}")


def _fused_count(net) -> dict:
    """How many of ``net``'s adapters the fused op takes, and why the others keep the aten form."""
    from ..nn.scriptable import fused_forms

    why = fused_forms(net)
    return {"fused": sum(r is None for r in why.values()), "adapters": len(why),
            "aten": {name: r for name, r in why.items() if r is not None}}


def _run_exported(module, fmt: str, batch: dict, virials: bool):
    """(energy, forces, virials or None) of the exported ``module`` on ``batch``: what ``pair_style
    mace`` asks of a LAMMPS file (``compute_virials`` for the pressure), or the scripted model's."""
    data = {k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)}
    if fmt == "lammps":
        local = torch.ones(data["positions"].shape[0], dtype=data["positions"].dtype)
        out = module(data, local, virials)
        e = out["total_energy_local"]
    else:
        out = module(data, training=False, compute_force=True, compute_virials=virials)
        e = out["energy"]
    return e.detach().sum(), out["forces"].detach(), (out["virials"].detach().reshape(3, 3) if virials else None)


def _eager(net, batch: dict, virials: bool):
    out = net(dict(batch), training=False, compute_force=True, compute_virials=virials)
    return out["energy"].detach().sum(), out["forces"].detach(), (out["virials"].detach().reshape(3, 3) if virials
                                                                  else None)


def _boxed(probe: dict, r_max: float) -> dict:
    """The probe's atoms periodic in a cubic box wider than their extent plus the cutoff (no atom
    sees an image): the same energy and forces, and a virial to check (LAMMPS pressure)."""
    pos = probe["positions"].double()
    side = float((pos.max(0).values - pos.min(0).values).max()) + float(r_max) + 1.0
    return {**probe, "cell": torch.eye(3, dtype=torch.float64) * side, "pbc": torch.ones(3, dtype=torch.bool)}


def _crowded(probe: dict, r_max: float) -> dict:
    """The probe's atoms periodic in a cubic box half a cutoff wider than their extent: atoms see
    images of each other (ghost atoms for the parallel pair style) no closer than ``r_max / 2``."""
    pos, lo = probe["positions"].double(), probe["positions"].double().min(0).values
    side = float((pos.max(0).values - lo).max()) + 0.5 * float(r_max)
    return {**probe, "positions": pos - lo + 0.25 * float(r_max), "cell": torch.eye(3, dtype=torch.float64) * side,
            "pbc": torch.ones(3, dtype=torch.bool)}


def _cluster(atomic_numbers) -> dict:
    """A reference frame for a checkpoint written before checkpoints held one: two atoms of each of
    the model's elements in a zigzag 1.1 Å apart (every pair within any cutoff's reach of a neighbour)."""
    numbers = [int(z) for z in atomic_numbers for _ in range(2)]
    pos = [[1.1 * i, 0.4 * (i % 2), 0.1 * (i % 3)] for i in range(len(numbers))]
    return {"numbers": torch.tensor(numbers), "positions": torch.tensor(pos, dtype=torch.float64),
            "cell": torch.zeros(3, 3, dtype=torch.float64), "pbc": torch.zeros(3, dtype=torch.bool)}


# (relative tolerance, floor of the force and virial scales, virial floor per atom; eV/Å, eV) of a file's
# check: float32 files round to a few 1e-6 eV/Å whatever the forces (a perfect crystal's vanish by
# symmetry: a 1e-3 floor refused correct files), so their scales never drop below 1, and a virial's
# rounding grows with the number of pair terms (64-atom diamond: 2.5e-5 eV on |W| = 1 eV), so its floor
# grows by 0.05 eV per atom; measured up to 7.8e-6 relative (SevenNet-0, random adapters and frames)
TOLERANCE = {torch.float64: (1e-9, 1e-3, 0.0), torch.float32: (2e-5, 1.0, 0.05)}


def _rel_diff(got, want, dtype: torch.dtype = torch.float64) -> float:
    """The largest relative difference of ``(energy, forces, virials or None)`` ``got`` from ``want``:
    the energy relative to max(1, |E|), forces and virials to their largest entry floored as
    :data:`TOLERANCE` says for ``dtype``."""
    _, floor, per_atom = TOLERANCE[dtype]
    (e1, f1, v1), (e0, f0, v0) = got, want
    rel = max(float((e1 - e0).abs()) / max(1.0, float(e0.abs())),
              float((f1 - f0).abs().max()) / max(floor, float(f0.abs().max())))
    if v0 is not None:
        rel = max(rel, float((v1 - v0).abs().max()) / max(floor, per_atom * f0.shape[0], float(v0.abs().max())))
    return rel


def _verify(module, fmt: str, checks, dtype: torch.dtype) -> float:
    """The largest relative difference (energy, forces, virials) between the exported ``module``
    and the eager model on each ``(batch, eager result)`` of ``checks``; raises when above the
    tolerance of ``dtype``."""
    tol = TOLERANCE[dtype][0]
    rel = max(_rel_diff(_run_exported(module, fmt, batch, want[2] is not None), want, dtype) for batch, want in checks)
    if not rel <= tol:
        raise ValueError(f"the exported {fmt} model does not reproduce the checkpoint's model on its "
                         f"reference frame (relative difference {rel:.3g} > {tol:g}); nothing was written")
    return rel


def _write_verified(out: pathlib.Path, save, verify) -> float:
    """``save(tmp)`` to a temporary name beside ``out``, ``verify(tmp)`` (raises when the file is
    wrong), then the file takes the name ``out`` (a symlink is written through, an old file's mode
    kept); nothing is left behind when either fails."""
    from ..train.atomic import atomic_path

    if out.exists() and not out.is_file():  # a FIFO or a device: the file is read back to be checked
        raise ValueError(f"--out {out} exists and is not a regular file; an exported model is written to "
                         f"a file and read back to be checked: give a file path")
    with atomic_path(out, suffix=".part") as tmp:
        save(tmp)
        rel = verify(tmp)
    return rel


def _is_sevennet(model) -> bool:
    from ..integrations.sevenn import SevenNetAsMACE

    return isinstance(model, SevenNetAsMACE)


def _check_parallel_out(out: pathlib.Path, overwrite: bool) -> None:
    """``--out`` of ``lammps-parallel`` is a directory: new, or with ``overwrite`` one that holds
    nothing but segment files (``deployed_parallel_<i>.pt``), so no other file is deleted."""
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            what = "a symbolic link" if out.is_symlink() else "not a directory"
            raise FileExistsError(f"--out {out} exists and is {what}; --format {PARALLEL} writes a directory of "
                                  "segment files (give a directory path)")
        if not overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
        _only_segments(out, out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the directory {out.parent} does not exist")


_SEGMENT = re.compile(r"deployed_parallel_\d+\.pt")


def _write_verified_dir(out: pathlib.Path, save, verify) -> float:
    """:func:`_write_verified` for a directory: ``save(tmp)`` fills a temporary directory beside
    ``out``, ``verify(tmp)`` checks it, then it takes the name ``out`` (and an old ``out``'s mode).
    An old ``out`` is moved aside first, checked again to hold only segment files (refused and put
    back otherwise), and removed only once the new one has its name; interrupted between the two
    renames, the old one is put back."""
    import shutil

    from .files import current_umask, umask_mode

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=str(out.parent)))
    old = tmp.with_suffix(".old")
    try:
        save(tmp)
        rel = verify(tmp)
        for f in tmp.iterdir():
            umask_mode(f)
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~current_umask())
        try:
            if out.exists():
                os.replace(out, old)
                _only_segments(old, out)
            os.replace(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists() and out.exists():
            shutil.rmtree(old)
    return rel


def _only_segments(directory: pathlib.Path, name: pathlib.Path) -> None:
    stray = sorted(p.name for p in directory.iterdir() if not _SEGMENT.fullmatch(p.name))
    if stray:
        raise FileExistsError(f"--out {name} holds files that are not segment files ({', '.join(stray[:5])}); "
                              "give a new directory, nothing was replaced")


def _eager_frames(net, frames):
    """``(atoms, (energy, forces, virial or None))`` of the eager ``net`` (MACE or SevenNet) on each
    frame, float64 copies; the virial ``W = -V σ`` (LAMMPS's) on periodic frames."""
    from ..train.selfcheck import probe_atoms, probe_batch

    out = []
    for frame in frames:
        atoms = probe_atoms(frame)
        pbc = bool(atoms.pbc.all())
        res = net(probe_batch(net, frame), training=False, compute_force=True, compute_stress=pbc)
        virial = -res["stress"][0].detach().double() * atoms.get_volume() if pbc else None
        out.append((atoms, (res["energy"].detach().double().sum(), res["forces"].detach().double(), virial)))
    return out


def _sevennet_checks(net, probe: dict, r_max: float, fmt: str):
    """The eager model (:func:`_eager_frames`) on the reference frame and in a box where no atom sees an
    image (``lammps``) or where atoms see images (the parallel files: ghost atoms); the virials."""
    if fmt == PARALLEL:
        return _eager_frames(net, [probe, _crowded(probe, r_max)])
    return _eager_frames(net, [probe] + ([] if bool(torch.as_tensor(probe["pbc"]).all()) else [_boxed(probe, r_max)]))


def _sevennet_request(base: str, fmt: str, dtype: Optional[str]) -> str:
    """The pair style a SevenNet checkpoint (``base``) exports to as ``fmt``; raises for a format or
    dtype that SevenNet's pair styles cannot run."""
    from ..integrations import sevenn_deploy as sd

    style = sd.PAIR_STYLE_PARALLEL if fmt == PARALLEL else sd.PAIR_STYLE
    if fmt not in ("lammps", *SEVENN_ONLY):
        raise ValueError(f"a SevenNet checkpoint (base {base!r}) exports as --format lammps (the file of "
                         f"SevenNet's pair_style {sd.PAIR_STYLE}), {PARALLEL} (pair_style {sd.PAIR_STYLE_PARALLEL}) "
                         f"or sevenn-checkpoint (sevenn's own tools); --format {fmt} is for MACE models")
    if dtype not in (None, "float32"):
        raise ValueError(f"{'sevenn runs float32' if fmt == 'sevenn-checkpoint' else f'SevenNet pair_style {style} runs float32'} "
                         f"(its edge vectors are float32); --dtype {dtype} cannot be exported for --format {fmt}")
    return style


def _export_sevennet(net, ckpt: dict, out: pathlib.Path, fmt: str, dtype: Optional[str], kernels: str = "aten",
                     trust_pickle: bool = False) -> dict:
    """A SevenNet checkpoint as the file of SevenNet's LAMMPS pair style (``pair_style e3gnn``,
    float32: the pair passes float32 edge vectors), or for ``lammps-parallel`` the directory of
    segment files of ``pair_style e3gnn/parallel``, checked as the pair runs them
    (:mod:`~mmea_kernels.integrations.sevenn_deploy`) against the eager model on the reference
    frame and periodic copies of it (:func:`_sevennet_checks`)."""
    from ..integrations import sevenn_deploy as sd
    from ..train.foundation import model_info

    style = _sevennet_request(ckpt["model"], fmt, dtype)
    if fmt == "sevenn-checkpoint":
        from .deploy_sevenn import export_sevenn_checkpoint

        return export_sevenn_checkpoint(net, ckpt, out, trust_pickle)
    from ..integrations.export import check_scriptable_model
    from ..peft.inject import tensor_product_gates

    try:  # before the reference runs: what cannot be scripted is refused at once
        check_scriptable_model(net)
        for gate in tensor_product_gates(net).values():
            gate.__prepare_scriptable__()  # raises: mmea-tp has no TorchScript form
    except _SCRIPT_ERRORS as exc:
        raise _not_scriptable(exc, fmt) from exc
    net = net.to(torch.float32).eval()
    z, r_max = model_info(net)
    checks = _sevennet_checks(net, ckpt.get("probe") or _cluster(z), r_max, fmt)
    folded = _fold_parametrizations(net)
    fused = _fused_count(net) if kernels == "cpp" else None
    try:
        if fmt == PARALLEL:
            modules, metadata = sd.sevennet_lammps_parallel_models(net, kernels)
        else:
            module, metadata = sd.sevennet_lammps_model(net, kernels)
            modules = [module]
    except _SCRIPT_ERRORS as exc:
        raise _not_scriptable(exc, fmt) from exc

    def verify(paths):
        loaded = [torch.jit.load(str(p)) for p in paths]
        run = ((lambda a, v: sd.run_like_pair_e3gnn_parallel(loaded, a, metadata, v)) if fmt == PARALLEL else
               (lambda a, v: sd.run_like_pair_e3gnn(loaded[0], a, metadata, v)))
        tol = TOLERANCE[torch.float32][0]
        rel = max(_rel_diff(run(atoms, want[2] is not None), want, torch.float32) for atoms, want in checks)
        if not rel <= tol:
            raise ValueError(f"the exported pair_style {style} file does not reproduce the checkpoint's model on "
                             f"its reference frame (relative difference {rel:.3g} > {tol:g}); nothing was written")
        return rel

    symbols = metadata["chemical_symbols_to_index"]
    if fmt == PARALLEL:
        names = [f"deployed_parallel_{i}.pt" for i in range(len(modules))]

        def save(tmp):
            for name, module in zip(names, modules):
                module.save(str(tmp / name), _extra_files=metadata)

        rel = _write_verified_dir(out, save, lambda tmp: verify([tmp / name for name in names]))
        pair = (f"pair_style {style}; pair_coeff * * {len(names)} {out} <one element per atom type, of {symbols}> "
                "(SevenNet's patched LAMMPS: sevenn_patch_lammps; or DIR/lmp of mmea-kernels lammps-build --dir DIR "
                "after plugin load DIR/e3gnn_parallel.so; newton on, comm_style brick; each process's "
                "sub-domain thicker than the cutoff + skin, else the pair stops: 'Cell size is too small')")
    else:
        rel = _write_verified(out, lambda tmp: modules[0].save(tmp, _extra_files=metadata), lambda tmp: verify([tmp]))
        pair = (f"pair_style {style}; pair_coeff * * {out} <one element per atom type, of {symbols}> "
                "(SevenNet's patched LAMMPS: sevenn_patch_lammps; or DIR/lmp of mmea-kernels lammps-build --dir DIR "
                "after plugin load DIR/e3gnn.so)")
    if kernels == "cpp":
        pair += "; --kernels cpp: only the plugins of mmea-kernels lammps-build load it (with DIR/mmea_ops.so)"
    return {"out": str(out), "format": fmt, "dtype": "float32", "method": ckpt["method"], "base_model": ckpt["model"],
            "atomic_numbers": [int(v) for v in z], "r_max": float(r_max), "folded_parametrizations": folded,
            "verified_max_rel_diff": rel, "kernels": kernels, **({"fused_adapters": fused} if fused else {}),
            "lammps": pair}


def export_checkpoint(checkpoint, out, fmt: str = "lammps", model: Optional[str] = None, dtype: Optional[str] = None,
                      trust_pickle: bool = False, overwrite: bool = False, mliap_backend: Optional[str] = None,
                      kernels: str = "aten") -> dict:
    """Write ``checkpoint``'s fine-tuned model to ``out`` as ``fmt`` (:data:`FORMATS`); ``dtype``: float64
    (default for the lammps formats, as mace-torch's ``create_lammps_model``) or float32; the others default
    to the checkpoint's. ``kernels``: "aten" (portable) or "cpp" (lammps, lammps-parallel, torchscript:
    MMEA adapters as one C++ op; :func:`~mmea_kernels.nn.scriptable.script_kernels`). Returns a summary."""
    from ..train import load_finetuned
    from ..train.checkpoint import read_checkpoint
    from ..train.foundation import model_info
    from ..train.selfcheck import probe_batch
    from .files import check_outputs, checkpoint_inputs

    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; expected float32 or float64")
    if mliap_backend is not None and fmt != "lammps-mliap":
        raise ValueError(f"--mliap-backend is for --format lammps-mliap, not --format {fmt}")
    _check_kernels(kernels, fmt)
    out = pathlib.Path(out)
    if fmt == PARALLEL:
        _check_parallel_out(out, overwrite)
    else:
        check_outputs({"--out": str(out)}, overwrite, checkpoint_inputs(checkpoint, model), regular=True)
    if model is None and (fmt not in ("lammps", PARALLEL) or dtype not in (None, "float32")):  # a SevenNet base
        if (named := str(read_checkpoint(checkpoint)["model"])).startswith("sevenn:"):  # cannot run it: refused
            _sevennet_request(named, fmt, dtype)  # before the model is built
    net, ckpt = load_finetuned(checkpoint, model, trust_pickle=trust_pickle, device="cpu")
    if _is_sevennet(net):
        return _export_sevennet(net, ckpt, out, fmt, dtype, kernels, trust_pickle)
    if fmt in SEVENN_ONLY:
        raise ValueError(f"--format {fmt} is SevenNet's {'pair_style e3gnn/parallel' if fmt == PARALLEL else 'checkpoint'}; "
                         f"checkpoint {checkpoint} holds a {type(net).__name__} (base {ckpt['model']!r}): use --format "
                         "lammps (pair_style mace, one or several processes), lammps-mliap (ML-IAP) or mace-model")
    if not _is_mace(net):
        raise ValueError(f"export is for MACE and SevenNet models; checkpoint {checkpoint} holds a "
                         f"{type(net).__name__} (base {ckpt['model']!r}), which has no TorchScript export here: "
                         "run its MD through the ASE calculator (mmea-kernels md, MMEACalculator)")
    want = _DTYPES[dtype or ("float64" if fmt.startswith("lammps") else ckpt["dtype"])]
    if fmt in ("lammps-mliap", "mace-model"):  # pickles, as mace-torch makes them
        from .deploy_mace import export_mace_model
        from .deploy_mliap import export_mliap

        return (export_mliap(net, ckpt, out, want, mliap_backend) if fmt == "lammps-mliap" else
                export_mace_model(net, ckpt, out, want))
    if any(is_cuet_linear(m) for m in net.modules()):
        raise ValueError(f"checkpoint {checkpoint} holds a cuEquivariance-form MACE, which does not script "
                         "(cuequivariance's naive path fails under TorchScript): export it as --format lammps-mliap, "
                         "or fine-tune the e3nn form")
    net = net.to(want).eval()
    z, r_max = model_info(net)
    probe = ckpt.get("probe") or _cluster(z)
    frames = [probe] + ([] if bool(torch.as_tensor(probe["pbc"]).all()) else [_boxed(probe, r_max)])
    checks = []
    for frame in frames:  # the eager model, before it is scripted; net is in `want` now, on the CPU
        batch = probe_batch(net, frame)
        checks.append((batch, _eager(net, batch, bool(torch.as_tensor(frame["pbc"]).all()))))
    folded, head = _fold_parametrizations(net), head_summary(net, fmt)  # before scripting takes the HeadHook
    gates = len(replace_gates(net))  # mace's GatedEquivariantBlock (non-linear blocks) does not script; FusedGate does
    fused = _fused_count(net) if kernels == "cpp" else None
    module = _script(net, fmt, want, kernels)  # in place: net is this function's own copy
    rel = _write_verified(out, lambda tmp: module.save(tmp), lambda tmp: _verify(torch.jit.load(tmp), fmt, checks, want))
    from ase.data import chemical_symbols

    return {"out": str(out), "format": fmt, "dtype": str(want).replace("torch.", ""), "method": ckpt["method"],
            "base_model": ckpt["model"], "atomic_numbers": [int(v) for v in z], "r_max": float(r_max),
            "folded_parametrizations": folded, "verified_max_rel_diff": rel, "kernels": kernels, **head,
            **({"fused_gates": gates} if gates else {}),
            **({"fused_adapters": fused} if fused is not None else {}),
            **({"lammps": f"plugin load DIR/mace.so (the LAMMPS of mmea-kernels lammps-build --dir DIR; "
                          + ("the file needs its kernels: not ACEsuit's LAMMPS" if kernels == "cpp" else
                             "or ACEsuit's LAMMPS") + f"); pair_style mace no_domain_decomposition (one process; needs "
                          f"atom_modify map yes) or pair_style mace (domain decomposition, any number of "
                          f"processes); pair_coeff * * {out} <one element per atom type, of "
                          f"{' '.join(chemical_symbols[int(v)] for v in z)}>"} if fmt == "lammps" else {})}
