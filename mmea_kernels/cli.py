"""Command line: ``mmea-kernels demo`` (also ``python -m mmea_kernels demo``)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmea-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="pretrain a small MACE, adapt it with MMEA and ELoRA, print the table")
    demo.add_argument("--data-dir", default=None, help="rMD17 splits (default: $MMEA_RMD17_DIR or ../shared/data/rmd17)")
    demo.add_argument("--pretrain-steps", type=int, default=300)
    demo.add_argument("--adapt-steps", type=int, default=150)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run
        run(args.data_dir, args.pretrain_steps, args.adapt_steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
