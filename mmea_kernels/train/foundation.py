"""Where a base (foundation) model comes from, and how it is identified.

A model spec is one of
- ``builtin:<name>``: a model shipped in ``mmea_kernels/assets/<name>.pt`` (default
  ``builtin:mace-xtb-small``, the project's own MACE pretrained on GFN2-xTB data);
- ``preset:<name>``: an untrained MACE of a named architecture (:data:`models.mace.PRESETS`), for
  training from scratch; its random weights are drawn from a fixed seed (:data:`PRESET_SEED`), so
  the same spec gives the same weights in every process;
- a path to a file saved by this package (``{"format": "mmea_kernels.model/1", "config", "state_dict"}``),
  to a whole model pickled by mace-torch (``*.model``), or to a bare state dict together with
  ``config=`` (a JSON file or dict of :class:`models.mace.MACEConfig` fields);
- ``mace-off:<small|medium|large>`` / ``mace-mp:<small|medium|large>``: the public MACE foundation
  models through mace-torch's own loaders (downloads them: needs internet);
- ``sevenn:<name>``: a pretrained SevenNet (``sevenn:7net-0`` = SevenNet-0, shipped with the sevenn
  wheel, offline) behind mace-torch's interface (:func:`models.sevenn.load_sevennet`).
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..integrations.heads import use_head
from ..nn.tp_slices import split_tp_slices
from .safe_load import safe_load

__all__ = ["MODEL_FORMAT", "DEFAULT_MODEL", "ASSETS", "load_model", "save_model", "fingerprint", "model_info"]

MODEL_FORMAT = "mmea_kernels.model/1"
DEFAULT_MODEL = "builtin:mace-xtb-small"
PRESET_SEED = 0  # the random weights of a ``preset:`` model
ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"


def save_model(model: nn.Module, config, path, **meta) -> None:
    """Write ``model``'s weights with its :class:`MACEConfig` (plus ``meta``) in this package's format."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    torch.save({"format": MODEL_FORMAT, "config": cfg, "state_dict": model.state_dict(), "meta": meta}, str(path))


def _from_config(cfg: dict, state_dict: Optional[dict], source: str) -> nn.Module:
    from ..integrations.mace import MACEConfig, build_mace

    fields = set(MACEConfig.__dataclass_fields__)
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown MACE config keys {unknown}; expected a subset of {sorted(fields)}")
    with torch.random.fork_rng(devices=[]):  # random initial weights, replaced below: the caller's RNG untouched
        model = build_mace(MACEConfig(**cfg))
    if state_dict is not None:
        own = model.state_dict()
        shapes = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} for the config"
                  for k, v in state_dict.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
        if shapes:
            raise ValueError(f"{source}: the state dict does not fit the config: {len(shapes)} tensor(s) of "
                             f"another shape ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: the state dict does not fit the config "
                             f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    return model


def _model_config(config) -> dict:
    """The MACEConfig fields of ``--model-config``: a dict, or the path of a JSON object."""
    if isinstance(config, (str, pathlib.Path)):
        path = pathlib.Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"model config {path} is not JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ValueError(f"model config {path} holds a JSON {type(config).__name__}, not an object of "
                             "MACEConfig fields")
    return dict(config)


def _mace_foundation(spec: str, head: Optional[str] = None) -> nn.Module:
    """``mace-off:<size>`` / ``mace-mp:<size>`` through mace-torch's own loaders (they download)."""
    family, size = spec.split(":", 1)
    from mace.calculators import foundations_models as fm

    names = getattr(fm, "mace_off_urls", {}) if family == "mace-off" else \
        set(getattr(fm, "mace_mp_names", [])) | set(getattr(fm, "mace_mp_urls", {}))
    if size not in names:
        # mace-torch's loaders take a path or URL too and unpickle it whole (code the file names)
        raise ValueError(f"{spec}: after {family}: give one of mace-torch's model names "
                         f"({', '.join(sorted(str(n) for n in names if n))}), not a path or URL; a model file "
                         "goes in as --model PATH (read weights-only; a whole pickled model needs --trust-pickle)")
    from mace import calculators

    loader = calculators.mace_off if family == "mace-off" else calculators.mace_mp
    try:  # mace's calculator wants a head for a multi-head model without a Default one
        calc = loader(model=size, device="cpu", default_dtype="float64", return_raw_model=False,
                      **({"head": head} if head is not None else {}))
    except Exception as exc:
        if isinstance(exc, ValueError) and "head" in str(exc).lower():
            raise ValueError(f"{spec}: {exc} (choose one with --head NAME; API: head=...)") from None
        raise RuntimeError(f"could not load {spec} through mace-torch ({type(exc).__name__}: {exc}); "
                           "the foundation models are downloaded, so this needs internet") from None
    return calc.models[0]


def load_model(spec: str = DEFAULT_MODEL, config: Union[None, str, dict] = None,
               dtype: Optional[torch.dtype] = None, trust_pickle: bool = False,
               fused_gate: bool = True, unused_config: str = "refuse", head: Optional[str] = None,
               split_slices: bool = True) -> nn.Module:
    """The base model named by ``spec`` (see the module docstring), in eval mode, on the CPU.

    ``config`` (``--model-config``) is for a file holding a bare state dict; given with a model that
    brings its own architecture it is refused (``unused_config="refuse"``) or ignored (``"ignore"``:
    checkpoints from before this check kept such a config, which was ignored then too).

    ``head``: the head a multi-head mace model runs from now on (default: its only head, or the one
    named Default; see :mod:`~mmea_kernels.integrations.heads`), kept as ``model.mmea_head``.

    ``fused_gate``: a SevenNet model gets :class:`~mmea_kernels.nn.FusedGate` in place of its e3nn
    ``Gate`` layers (same state dict, same numbers, faster); ``False`` keeps e3nn's.

    ``split_slices``: :func:`~mmea_kernels.nn.tp_slices.split_tp_slices` on the model (one split per
    tensor in e3nn's generated code: same numbers, faster backward); ``False`` keeps e3nn's code.

    Files are read with ``weights_only=True``; a whole pickled model (mace-torch ``*.model``) needs
    ``trust_pickle=True``, since unpickling runs code named by the file (:mod:`.safe_load`)."""
    spec = str(spec)
    if unused_config not in ("refuse", "ignore"):
        raise ValueError(f"unused_config must be 'refuse' or 'ignore', got {unused_config!r}")
    if config is not None and spec.startswith(("builtin:", "preset:", "mace-off:", "mace-mp:", "sevenn:")):
        if unused_config == "ignore":
            return load_model(spec, None, dtype, trust_pickle, fused_gate, head=head, split_slices=split_slices)
        raise ValueError(f"--model-config is for a base model file that holds a bare state dict; {spec} brings its "
                         "own architecture")
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        have = sorted(p.stem for p in ASSETS.glob("*.pt"))
        if name not in have:  # a name, never a path (builtin:../x, builtin:/abs): those are files, --model PATH
            raise FileNotFoundError(f"no built-in model {name!r} (have {have}); a file is named without "
                                    "'builtin:': --model PATH")
        path = ASSETS / f"{name}.pt"
        model = load_model(str(path), split_slices=split_slices)
    elif spec.startswith("preset:"):
        from ..integrations.mace import build_mace

        # a preset's weights are random: drawn from a fixed seed, so that the spec names one model
        # (a checkpoint fine-tuned from it finds the same base weights when it is loaded again);
        # the caller's random state is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_SEED)
            model = build_mace(spec.split(":", 1)[1])
    elif spec.startswith(("mace-off:", "mace-mp:")):
        model = _mace_foundation(spec, head)
    elif spec.startswith("sevenn:"):
        from ..integrations.sevenn import load_sevennet

        model = load_sevennet(spec.split(":", 1)[1], fused_gate=fused_gate, trust_pickle=trust_pickle)
    else:
        path = pathlib.Path(spec)
        obj = safe_load(path, "model file", trust_pickle=trust_pickle, allow_pickle=True)
        if config is not None and not (isinstance(obj, dict) and not obj.get("format")) and unused_config == "refuse":
            raise ValueError(f"--model-config is for a base model file that holds a bare state dict; {path} holds "
                             "a whole model (its architecture is in the file)")
        if isinstance(obj, nn.Module):
            model = obj
        elif isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
            model = _from_config(obj["config"], obj["state_dict"], str(path))
        elif isinstance(obj, dict) and obj.get("format"):
            raise ValueError(f"{path} is a {obj['format']!r} file, not a model; "
                             "pass the base model it was trained from instead")
        elif isinstance(obj, dict):
            if config is None:
                raise ValueError(f"{path} holds a bare state dict: give its MACE architecture with --model-config "
                                 "(JSON of MACEConfig fields); the weights of another model (NequIP, ...) cannot be "
                                 "rebuilt here: adapt such a model with the Python API (docs/ecosystem.md)")
            model = _from_config(_model_config(config), obj, str(path))
        else:
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a model or state dict")
    _check_supported(model, spec)
    if dtype is not None:
        model = model.to(dtype)
    use_head(model, head, where=spec)
    if split_slices:
        split_tp_slices(model)
    return model.eval()


def _check_supported(model: nn.Module, where: str) -> None:
    """``ValueError`` for a mace-torch model this package would run wrongly: one without per-element
    energies (dipole-only models), or one that takes more inputs than the structure (``embedding_specs``:
    total charge and spin as MACE-OMOL, which the batches here do not carry: every structure would run
    as charge 0, spin 1)."""
    name = type(model).__name__
    if hasattr(model, "r_max") and not hasattr(model, "atomic_energies_fn"):
        raise ValueError(f"{where} is a {name}, which has no per-element energies (atomic_energies_fn): this package "
                         "fine-tunes models of energies and forces (MACE, ScaleShiftMACE, SevenNet)")
    specs = getattr(model, "embedding_specs", None)
    if specs:
        raise ValueError(f"{where} is a {name} that takes {', '.join(map(str, specs))} as inputs besides the structure "
                         "(embedding_specs, e.g. total charge and spin): this package does not pass them, so every "
                         "structure would run as charge 0, spin 1; it is not supported")


def model_info(model: nn.Module) -> Tuple[list, float]:
    """(atomic numbers, cutoff radius) of a mace-torch model."""
    try:
        return [int(z) for z in model.atomic_numbers], float(model.r_max)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} is not a mace-torch model (no atomic_numbers / r_max): the CLI "
                         "fine-tunes MACE and SevenNet models; other e3nn models (NequIP, ...) take adapters and "
                         "FusedGate through the Python API (mk.inject_adapters, mk.replace_gates; docs/ecosystem.md)"
                         ) from None


def fingerprint(model: nn.Module) -> str:
    """A hash of a model's parameters and buffers (names, shapes, values rounded to float32, so the float32 and float64 copies agree), minus the
    per-element reference energies that fine-tuning re-fits: identifies the base model an
    adapter was trained on."""
    return state_digest(model)


def state_digest(model: nn.Module, exact: bool = False) -> str:
    """:func:`fingerprint`; ``exact``: every tensor of the state dict bit for bit in its own dtype, the
    reference energies too (the copies of one run's model in the processes of a torchrun run)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not torch.is_tensor(t) or (not exact and name.endswith("atomic_energies")):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        t = t.detach() if exact or not t.is_floating_point() else t.detach().to(torch.float32)
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())  # bytes: bf16 too
    return h.hexdigest()[:16]
