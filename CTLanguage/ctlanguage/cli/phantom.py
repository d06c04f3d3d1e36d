"""`ctlanguage phantom` subcommand: write a synthetic corpus with a progress bar."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="generate synthetic torso CTs with masks, reports and manifest.jsonl",
        description="Generate N synthetic torso CT cases (NIfTI CT, structure label map, one mask per "
                    "finding, report, montage PNG) and DIR/manifest.jsonl. Case i uses seed S+i.",
    )
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="voxel spacing in mm: one value (isotropic) or three (x y z); default random "
                        "~2 mm in-plane and 2-3 mm slices")
    p.add_argument("--no-orient", action="store_true", help="keep the canonical RAS-aligned voxel order")
    p.add_argument("--no-montage", action="store_true", help="skip the PNG montage per case")
    p.add_argument("--variation", choices=["none", "realistic", "fov", "phase", "full"], default="none",
                   help="scan-to-scan variation: 'realistic' draws field of view (torso, chest, abdomen, "
                        "20-60-slice abdominal slabs), contrast phase, HU shift, noise, kernel and slice "
                        "thickness 0.625-5 mm per case, recorded in the manifest; 'full': 'realistic' plus "
                        "arms up/down, CT table, fat thickness, a smooth random warp and calcifications; "
                        "'fov' / 'phase': only that factor (default none: the phantom as before)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..phantom.corpus import write_corpus

    if args.n < 1:
        raise InputError("--n must be at least 1.")
    spacing = None
    if args.spacing is not None:
        if len(args.spacing) not in (1, 3):
            raise InputError("--spacing takes one value or three values (x y z).")
        spacing = args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)
    from .query import check_output_parent

    check_output_parent(args.out)  # before the progress bar: the error comes first and alone
    quiet = getattr(args, "quiet", False)
    bar = None
    if not quiet:
        try:
            from tqdm import tqdm

            bar = tqdm(total=args.n, unit="case", desc="phantom", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None
    state = {"done": 0}

    def progress(frac, msg):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(msg)

    stats = write_corpus(args.out, args.n, seed=args.seed, spacing=spacing, orient=not args.no_orient,
                         montage=not args.no_montage, workers=max(1, args.workers), progress=progress,
                         variation=args.variation)
    if bar is not None:
        bar.close()
    if not quiet:
        print(f"wrote {stats['n']} cases to {args.out} ({stats['cases_per_s']:.2f} cases/s, "
              f"generation {stats['generate_s_mean']:.2f} s/case); manifest: {stats['manifest']}")
    del state
    return 0
