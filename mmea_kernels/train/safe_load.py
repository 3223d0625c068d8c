"""Reading ``.pt`` files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, and unpickling can call any
function the file names: a crafted file runs its payload before anything is checked. Everything
this package writes (model files, fine-tuning checkpoints, ``state.pt``, adapter files) holds only
tensors, dicts, lists, strings and numbers, which ``weights_only=True`` reads. Only a whole model
pickled by mace-torch (``*.model``) needs full unpickling; :func:`safe_load` does that only when
asked (``trust_pickle=True``, ``--trust-pickle``).

``weights_only=True`` alone is not enough: what torch's weights-only unpickler accepts is a registry
for the whole process, and importing parts of torch adds to it (``torch._dynamo``, which the CLI
imports, registers ``DeviceMesh`` and ``DTensor``: unpickling a ``DeviceMesh`` starts
``torch.distributed`` from the environment's ``RANK``/``MASTER_*``, opening a port or hanging the
process; found in review). So before torch reads a file, every class or function its pickles name is
checked against this package's own short list (:data:`PLAIN_GLOBALS`: the tensor rebuild functions,
storages, dtypes, ``OrderedDict``); anything else is refused as needing full unpickling.
"""
from __future__ import annotations

import io
import pathlib
import pickle
import pickletools
import re
import warnings
import zipfile

import torch

from ..integrations.files import UnsafeFileError

__all__ = ["UnsafeFileError", "safe_load", "load_adapter_file", "PLAIN_GLOBALS"]

# What a file of tensors, dicts, lists, strings and numbers names (torch.save, protocol 2): the tensor
# and parameter rebuild functions, storages (torch.FloatStorage, ...), dtypes, torch.Size/device,
# OrderedDict, _codecs.encode (how protocol 2 writes bytes) and the plain builtins (sets, complex)
PLAIN_GLOBALS = frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict",
    "torch.Size", "torch.device", "_codecs.encode", "torch.storage.UntypedStorage", "torch.serialization._get_layout",
    "torch.nn.parameter.Parameter", "torch.Tensor", "collections.Counter",
    "builtins.set", "builtins.frozenset", "builtins.complex", "builtins.bytearray",  # plain values, as torch's own list
}) | frozenset(f"torch.{n}" for n in dir(torch) if n.endswith("Storage") or isinstance(getattr(torch, n, None), torch.dtype))
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_PUTS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


_TORCH = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])


def _needs_pickle(exc: Exception) -> str:
    """What the weights-only unpickler refused (a class or function name), or '' for another error."""
    msg = str(exc)
    if "Weights only load failed" not in msg:
        return ""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)|unsupported GLOBAL ([\w.]+)|Unsupported operand \d+", msg)
    if m:
        return m.group(1) or m.group(2) or m.group(0)
    return "objects other than tensors and plain containers"


def safe_load(path, what: str, trust_pickle: bool = False, allow_pickle: bool = False):
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True``.

    A file that needs full unpickling raises :class:`UnsafeFileError` (naming what it refers to),
    unless ``allow_pickle`` (this kind of file may be a whole pickled model) and ``trust_pickle``
    (the user vouches for it) are both true. A missing file raises ``FileNotFoundError``; a
    truncated or foreign file ``ValueError``."""
    path = pathlib.Path(path)
    if _TORCH < (2, 6):  # installed past setup.py's torch>=2.6 (--no-deps): not a safe reader there
        raise ValueError(f"torch {torch.__version__}'s weights-only loader can be made to run code (CVE-2025-32434, "
                           f"fixed in torch 2.6): {what} {path} is not read; install torch >= 2.6")
    if path.is_dir():
        inside = path / "checkpoint.pt"
        raise IsADirectoryError(f"{what} {path} is a directory" + (f"; the run's checkpoint is {inside}"
                                                                   if inside.is_file() else "; give a file"))
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        # neither torch's zip format nor a (legacy-format) pickle: a text file, an .xyz, ... The weights-only
        # unpickler would call it 'Unsupported operand N', which reads as a pickle to trust: it is not one
        raise _unreadable(path, what, ValueError(f"it starts with {head!r}, not a zip archive or a pickle"))
    if head.startswith(b"PK") and _is_torchscript(path):
        raise ValueError(f"{what} {path} is a TorchScript file (an exported model: torch.jit.save, mmea-kernels "
                         f"export), not a {what}: give the file that was exported from (a fine-tuning checkpoint.pt, "
                         "or the base model)")
    named = _foreign_globals(path, head)
    if named:
        if allow_pickle and trust_pickle:
            return _full_load(path, what)
        raise UnsafeFileError(_refusal(path, what, named, allow_pickle))
    try:
        with warnings.catch_warnings():  # torch's "pickle protocol 4" notice about a file refused next
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _needs_pickle(exc)
        if not refused:
            raise _unreadable(path, what, exc) from None
        if allow_pickle and trust_pickle:
            return _full_load(path, what)
        raise UnsafeFileError(_refusal(path, what, refused, allow_pickle)) from None
    except Exception as exc:  # zip / pickle errors: a truncated or foreign file
        raise _unreadable(path, what, exc) from None


def load_adapter_file(model, path, **options):
    """:func:`~mmea_kernels.load_adapter_state_dict` of the file ``path`` that ``torch.save`` wrote
    from :func:`~mmea_kernels.adapter_state_dict`, read with :func:`safe_load` (nothing in it runs);
    ``mk.load_adapter_file(model, "adapter.pt")``."""
    from ..peft import load_adapter_state_dict

    return load_adapter_state_dict(model, safe_load(path, "adapter file"), **options)


def _foreign_globals(path: pathlib.Path, head: bytes) -> str:
    """The first class or function that a pickle of ``path`` names outside :data:`PLAIN_GLOBALS`
    ('' when none): every ``.pkl`` member of a zip archive, or the leading pickles of the legacy
    format (magic number, protocol, system info, data, storage keys). A file whose pickles cannot be
    walked is left to torch's reader, which reports it."""
    try:
        if head.startswith(b"PK"):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    if name.endswith(".pkl"):
                        bad = _first_foreign(io.BytesIO(zf.read(name)))
                        if bad:
                            return bad
            return ""
        with open(path, "rb") as f:
            for _ in range(5):
                bad = _first_foreign(f)
                if bad:
                    return bad
    except Exception:  # noqa: BLE001 - truncated or foreign: torch.load names the problem
        return ""
    return ""


def _first_foreign(stream) -> str:
    """The first name outside :data:`PLAIN_GLOBALS` in the pickle at ``stream``'s position (read up to
    its STOP). STACK_GLOBAL takes its module and name from the stack: resolved where the two pushes
    before it are strings (or memo entries of strings), else refused as unresolved; INST and the
    copyreg extension codes are refused too (torch.save writes none of them)."""
    memo, pushed = {}, []  # pushed: the values of the last pushes (None: not a string)
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == "GLOBAL" or name == "INST":
            ref = re.sub(r"^__builtin__\.", "builtins.", arg.replace(" ", "."))  # protocol 2's name of builtins
            if ref not in PLAIN_GLOBALS:  # a builtin named bare ('getattr', 'eval'), as torch names it
                return re.sub(r"^builtins\.", "", ref)
        elif name == "STACK_GLOBAL":
            ref = ".".join(pushed[-2:]) if len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:]) else ""
            if ref not in PLAIN_GLOBALS:
                return ref or "a class or function named by values computed in the file (STACK_GLOBAL)"
        elif name.startswith("EXT"):
            return f"copyreg extension code {arg}"
        if name in _PUTS:
            memo[len(memo) if arg is None else arg] = pushed[-1] if pushed else None
        elif name in _STRINGS:
            pushed.append(arg)
        elif name in _GETS:
            pushed.append(memo.get(arg))
        elif op.stack_after or op.stack_before:
            pushed.append(None)
    return ""


def _is_torchscript(path: pathlib.Path) -> bool:
    """Whether the zip archive ``path`` is a TorchScript one (``<name>/code/`` or ``constants.pkl``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # torch.load reports it


def _full_load(path: pathlib.Path, what: str):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _unreadable(path, what, exc) from None


def _unreadable(path, what, exc) -> ValueError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
    return ValueError(f"{what} {path} could not be read as a torch file ({type(exc).__name__}: {detail}); "
                      "is it truncated or not a checkpoint?")


def _refusal(path, what, refused: str, allow_pickle: bool) -> str:
    head = (f"{what} {path} is not plain tensor data (it refers to {refused}); reading it needs full unpickling, "
            "which runs whatever code the file names")
    if allow_pickle:
        return (head + ". A whole mace-torch model (*.model) is such a pickle: if you trust where the file comes "
                "from, pass --trust-pickle (API: trust_pickle=True)")
    return head + ". Files written by mmea_kernels never need that, so it is refused (not a checkpoint of this package)"
