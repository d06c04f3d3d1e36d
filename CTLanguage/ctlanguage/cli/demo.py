"""`ctlanguage demo --out DIR`: the main job end to end, offline, on the embedded default model.

1. make a synthetic torso CT with the phantom (seeded) and write it as NIfTI and as a DICOM series;
2. read the DICOM series back (exactly as a user's scanner export would be read);
3. encode it once on the embedded default model;
4. answer several free-text prompts;
5. write every export (findings.json/.csv, masks/*.nii.gz, segmentation.seg.nrrd, report.html,
   segmentation.dcm referencing the series) and print a table of findings and where files are.
Nothing interactive is opened.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "liver",
    "left lung",
    "liver lesion",
    "fluid around the left lung",
    "fluid around the right lung",
    "kidney stone",
    "enlarged heart",
    "spleen",
]


def _phantom_volume(case):
    from ..volume import CTVolume

    v = case.volume
    if hasattr(v, "array"):
        return v
    return CTVolume(v, case.ijk_to_ras, source=f"phantom seed {case.seed}", modality="CT")


def _dice(a, b) -> float | None:
    """metrics.dice, with None for two empty masks (undefined) in the printed table."""
    import math

    from ..metrics import dice

    d = dice(a, b)
    return None if math.isnan(d) else d


def _to_grid(mask, src_ijk_to_ras, dst_ijk_to_ras, dst_shape):
    """Nearest-neighbour copy of a phantom-grid mask onto the grid the query ran on (the DICOM
    reader may order slices differently from the phantom, e.g. k flipped)."""
    import numpy as np

    m = np.linalg.inv(np.asarray(src_ijk_to_ras, float)) @ np.asarray(dst_ijk_to_ras, float)
    if np.allclose(m, np.eye(4), atol=1e-3) and tuple(mask.shape) == tuple(dst_shape):
        return mask
    k, j, i = np.indices(dst_shape, dtype=np.float32)
    out = np.zeros(dst_shape, dtype=mask.dtype)
    src = [np.rint(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3]).astype(np.int64) for r in range(3)]
    ok = np.ones(dst_shape, bool)
    for r, n in zip(range(3), (mask.shape[2], mask.shape[1], mask.shape[0])):
        ok &= (src[r] >= 0) & (src[r] < n)
    out[ok] = mask[src[2][ok], src[1][ok], src[0][ok]]
    return out


def _truth_for(case, f, volume) -> str:
    """What the phantom really contains for this finding (present/absent, Dice of the mask)."""
    import numpy as np

    def grid(mask):
        return _to_grid(mask, case.ijk_to_ras, volume.ijk_to_ras, volume.array.shape)

    try:
        if getattr(f, "finding", None):
            hits = [t for t in case.findings if t.name == f.finding
                    and (not f.laterality or not t.laterality or t.laterality == f.laterality)]
            if not hits:
                return "absent"
            union = np.zeros_like(hits[0].mask)
            for t in hits:
                union |= t.mask
            d = _dice(f.mask, grid(union)) if getattr(f, "mask", None) is not None else None
            return "present" + (f", Dice {d:.2f}" if d is not None else "")
        if getattr(f, "anatomy", None):
            d = _dice(f.mask, grid(case.anatomy_mask(f.anatomy)))
            return "—" if d is None else f"Dice {d:.2f}"
    except Exception:  # noqa: BLE001 - truth is a bonus column
        return "?"
    return "—"


def _truth_text(case) -> str:
    for name in ("report", "report_text"):
        v = getattr(case, name, None)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return ""


def _truth_labels(case) -> dict:
    v = getattr(case, "labels", None)
    return dict(v) if isinstance(v, dict) else {}


CASE_MARKER = ".ctlanguage-demo-case"   # the demo replaces only a case folder it wrote itself


def _check_case_dir_is_ours(case_dir: Path) -> None:
    from ..errors import InputError

    if case_dir.is_dir() and any(case_dir.iterdir()) and not (case_dir / CASE_MARKER).is_file():
        raise InputError(f"{case_dir} holds files that `ctlanguage demo` did not write; "
                         "choose another --out folder")
    if case_dir.exists() and not case_dir.is_dir():
        raise InputError(f"{case_dir} exists and is not a folder; choose another --out folder")


def cmd_demo(args) -> int:
    from .. import io as ctio
    from ..dicom_write import write_dicom_series
    from ..exports.atomic import check_writable_dir
    from .query import (Reporter, findings_table, load_model, mask_threshold, print_json,
                        query_and_export, split_prompt_args, stdout_console)

    reporter = Reporter(args.quiet)
    threshold = mask_threshold(args.mask_threshold)
    prompts = split_prompt_args(args.prompt) if args.prompt else list(DEFAULT_PROMPTS)
    out = Path(args.out)
    check_writable_dir(out)
    case_dir = out / "case"
    results = out / "results"
    _check_case_dir_is_ours(case_dir)
    timings: dict[str, float] = {}

    # 1. synthetic case
    t = time.perf_counter()
    with reporter.step(f"phantom case (seed {args.seed})") as cb:
        from ..phantom import generate_case

        case = generate_case(args.seed)
        cb(0.6, "writing NIfTI")
        volume = _phantom_volume(case)
        case_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / CASE_MARKER).write_text(json.dumps({"written_by": "ctlanguage demo"}) + "\n")
        ctio.write_volume(volume, case_dir / "ct.nii.gz")
        report = _truth_text(case)
        if report:
            (case_dir / "report.txt").write_text(report + "\n", encoding="utf-8")
        cb(0.8, "writing DICOM series")
        dicom_dir = case_dir / "dicom"
        if dicom_dir.exists():
            import shutil

            shutil.rmtree(dicom_dir)
        write_dicom_series(volume, dicom_dir, series_description=f"CTLanguage phantom seed {args.seed}")
    timings["phantom + NIfTI + DICOM"] = time.perf_counter() - t

    # 2. read it back as a user's DICOM folder
    t = time.perf_counter()
    with reporter.step("reading the DICOM series") as cb:
        volume = ctio.read_ct(dicom_dir)
        cb(1.0, "")
    timings["read DICOM"] = time.perf_counter() - t

    # 3. encode once
    t = time.perf_counter()
    model = load_model(args.model, args.device, reporter)
    timings["load model"] = time.perf_counter() - t
    t = time.perf_counter()
    with reporter.step("encoding") as cb:
        enc = model.engine.encode(volume, progress=cb)
    timings["encode"] = time.perf_counter() - t

    # 4. + 5. prompts and exports
    findings, result = query_and_export(model, enc, volume, prompts, results, reporter,
                                        mask_threshold=threshold, absent_masks=args.absent_masks,
                                        input_path=str(dicom_dir),
                                        extra={"demo": {"phantom_seed": args.seed}})
    timings[f"query ({len(prompts)} prompts)"] = result.timings["query"]
    timings["per prompt (mean)"] = result.timings["query"] / max(len(prompts), 1)
    timings["exports"] = result.timings["export"]

    if args.json:
        print_json(json.loads(result.files["findings.json"].read_text(encoding="utf-8")))
    elif not args.quiet:
        stdout_console().print(findings_table(
            findings, result,
            title=f"CTLanguage demo — model {model.info['id']} {model.info['version']}",
            extra={"phantom truth": [_truth_for(case, f, volume) for f in findings]}))
    if not args.quiet:
        from rich.table import Table

        con = reporter.console
        truth = _truth_labels(case)
        if truth:
            present = sorted(k for k, v in truth.items() if v)
            con.print(f"phantom truth (findings present): {', '.join(present) or 'none'}")
        tt = Table(title="timings (this machine)")
        tt.add_column("step")
        tt.add_column("seconds", justify="right")
        for k, v in timings.items():
            tt.add_row(k, f"{v:.3f}")
        con.print(tt)
        con.print(f"[bold]case[/bold]     {case_dir}/ (ct.nii.gz, dicom/{', report.txt' if report else ''})")
        con.print(f"[bold]results[/bold]  {results}/")
        for name in sorted(result.files):
            con.print(f"  {result.files[name]}")
        con.print(f"  {results / 'masks'}/ ({len(result.masks)} masks)")
        con.print("Research use only — synthetic data, not for diagnosis.")
    with contextlib.suppress(Exception):
        (out / "timings.json").write_text(json.dumps({k: round(v, 4) for k, v in timings.items()},
                                                     indent=2) + "\n")
    return 0


def register(subparsers) -> None:
    from .query import _add_model_args, add_json_arg, add_threshold_arg

    p = subparsers.add_parser(
        "demo", help="synthetic case -> encode -> several prompts -> all exports (offline)",
        description="Make a synthetic CT (NIfTI + DICOM series) with the phantom, encode it once on the "
                    "embedded default model, answer several prompts and write every export into DIR.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (case/ and results/)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    p.add_argument("--prompt", "-p", action="append",
                   help="prompt(s) to run instead of the default demo set (repeatable)")
    add_threshold_arg(p)
    add_json_arg(p, "results/findings.json (instead of the table)")
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)
