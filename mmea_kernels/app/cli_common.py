"""Command-line options several commands share (--debug, --device, --dtype, --trust-pickle, the data
checks), for :mod:`.cli` and :mod:`.cli_structure`."""
from __future__ import annotations

import argparse


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
