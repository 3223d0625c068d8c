"""Cost per MD step in LAMMPS of a fine-tuned file exported both ways, the portable one
(``export``'s default, ``--kernels aten``) and the fused one (``--kernels cpp``), each against the
base model's file in its own alternating rounds (median of paired ratios, IQR), one process, on the
benches' 162-atom box of rMD17 ethanol molecules, starting at rest (the full benches start at 300 K).
For SevenNet, whose full bench (``lammps_sevenn.py``: parity at 1, 2, 4 processes, 400 NVE steps, two
thread counts) takes far longer, this is the shorter check of the two file kinds; for MACE
``lammps_mace.py`` times both already.

    python bench/lammps_kernels.py --model sevenn --checkpoint /tmp/mmea_lammps_sevenn/finetune/checkpoint.pt \\
        --base /tmp/mmea_lammps_sevenn/7net-0.pt --rounds 9 --threads 1

(the checkpoint and base file of an earlier ``lammps_sevenn.py`` run). Writes ``--out``.json."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from lammps_sevenn import _cli, _timing, parser, setup_and_box, write_result  # noqa: E402

STYLES = {"sevenn": "e3gnn", "mace": "mace no_domain_decomposition"}


def main(argv=None) -> int:
    p = parser(__doc__, "MACE or SevenNet", "lammps-kernels")
    p.add_argument("--model", choices=tuple(STYLES), required=True)
    p.add_argument("--base", required=True, help="the base model's LAMMPS file")
    p.add_argument("--warmup", type=int, default=3, help="untimed force evaluations before each timed run")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        raise SystemExit("give --checkpoint (and --base): this bench exports, it does not fine-tune")
    setup, work, box, source = setup_and_box(args)
    files = {}
    for kernels in ("aten", "cpp"):
        files[kernels] = str(work / f"{args.model}-{kernels}.pt")
        _cli("export", "--checkpoint", args.checkpoint, "--out", files[kernels], "--overwrite", "--kernels", kernels)
    timing = [dict(kernels=k, **_timing(box, setup, work, f, args.base, args.steps, args.rounds, int(t),
                                        style=STYLES[args.model], names=("mmea", "base"), warmup=args.warmup))
              for t in args.threads.split(",") for k, f in files.items()]
    write_result(args, model=args.model, checkpoint=args.checkpoint, base=args.base, atoms=len(box),
                 molecules=source, timing=timing)
    for t in timing:
        print(f"{t['kernels']} {t['threads']} thread(s): {t['ratio_median']:.3f}x (IQR {t['ratio_iqr'][0]:.3f}-"
              f"{t['ratio_iqr'][1]:.3f}), ms/step {t['ms_per_step_median']['mmea']:.1f} / "
              f"{t['ms_per_step_median']['base']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
