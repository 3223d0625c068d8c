"""Command-line options several commands share (--debug, --device, --dtype, --trust-pickle, the data
checks), for :mod:`.cli` and :mod:`.cli_structure`."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings


def common_options(trust: bool = False, data: bool = False, device: bool = False,
            dtype: bool = False) -> argparse.ArgumentParser:
    """Options several commands share: --debug; --trust-pickle; the data-check thresholds; --device;
    --dtype (a checkpoint's model in another precision)."""
    from ..train.device import DEVICES_HELP

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    if device:
        p.add_argument("--device", default="auto", help=f"where the model runs: {DEVICES_HELP}; default auto")
    if dtype:
        p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                       help="run the checkpoint's model in this precision (default: the one it was trained in)")
    if trust:
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow a base model that is a whole pickled model (mace-torch *.model): unpickling runs "
                            "code from the file, so only for files from a source you trust")
    if data:
        p.add_argument("--min-distance", type=float, default=0.1, help="Å: refuse atoms closer than this")
        p.add_argument("--max-neighbors", type=int, default=500, help="refuse atoms with more neighbours in the cutoff")
        p.add_argument("--allow-small-cells", action="store_true",
                       help="accept periodic cells narrower than the cutoff (small bulk unit cells)")
    return p


def data_checks(args):
    from ..train.checks import DataChecks

    return DataChecks(args.min_distance, args.max_neighbors, args.allow_small_cells)


def seed_type(text: str) -> int:
    """argparse type of ``--seed``: an integer in [0, 2**63) (numpy's and torch's range), named when not."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"--seed must be an integer in [0, 2**63), got {text}")
    return value


@contextlib.contextmanager
def one_line_warnings(prog: str):
    """While a command runs, this package's own warnings (a data file cut short, energies outside the
    E0s' span, ...) print as one line, ``<prog>: warning: <message>``, as its errors do; any other
    warning as Python prints it."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not category.__module__.startswith("mmea_kernels"):
            return shown(message, category, filename, lineno, file, line)
        print(f"{prog}: warning: {message}", file=file if file is not None else sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
