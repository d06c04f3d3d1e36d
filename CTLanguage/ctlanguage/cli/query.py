"""`ctlanguage encode` and `ctlanguage query` (see docs/cli.md), and the steps `batch` and `demo` share.

These are thin wrappers: read the image (``io.read_ct``), load the model (``catalog`` resolves
ID/PATH, ``engine.Engine`` runs it), encode once, query all prompts, write every export
all-or-nothing (``exports.export_all``). Errors are CTLanguageError subclasses; the main CLI turns
them into one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import ExportError, InputError, PromptError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


# ============================================================================ progress output

class Reporter:
    """Progress bars on stderr (rich), silent with --quiet. ``step(desc)`` yields a callback
    ``(fraction, message)`` as used by the engine and the exports."""

    def __init__(self, quiet: bool = False, console=None):
        self.quiet = quiet
        self._console = console

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, quiet=self.quiet)
        return self._console

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[Callable[[float, str], None]]:
        if self.quiet:
            yield lambda fraction=0.0, message="": None
            return
        from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        t0 = time.perf_counter()
        last = {"msg": ""}
        if not self.console.is_terminal:  # logs/pipes: one line per finished step, no bars
            def note(fraction: float = 0.0, message: str = "") -> None:
                last["msg"] = message or last["msg"]

            yield note
            self._done(description, t0, last["msg"])
            return
        # transient: a failed step leaves no half-drawn bar above the one-line error
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                      TextColumn("[dim]{task.fields[msg]}"), console=self.console,
                      transient=True) as prog:
            task = prog.add_task(description, total=1.0, msg="")

            def cb(fraction: float = 0.0, message: str = "") -> None:
                last["msg"] = message or last["msg"]
                prog.update(task, completed=max(0.0, min(float(fraction), 1.0)), msg=message or "")

            yield cb
        self._done(description, t0, last["msg"])

    def _done(self, description: str, t0: float, message: str) -> None:
        msg = f" [dim]{message}[/dim]" if message and message != "done" else ""
        self.console.print(f"[green]✓[/green] {description} ({time.perf_counter() - t0:.1f} s){msg}",
                           highlight=False)

    def bytes_progress(self, description: str):
        """Context manager yielding a (done, total, message) callback for downloads."""
        if self.quiet:
            return contextlib.nullcontext(lambda done, total, message="": None)
        return _bytes_bar(self.console, description)

    def info(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)


@contextlib.contextmanager
def _bytes_bar(console, description):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console) as prog:
        task = prog.add_task(description, total=None)

        def cb(done: int, total: int | None, message: str = "") -> None:
            prog.update(task, completed=done, total=total)

        yield cb


# ============================================================================ shared steps

@dataclass
class LoadedModel:
    engine: Any
    info: dict                     # Engine.describe(): id, version, sha256, ... for findings.json
    path: Path | None = None


def load_model(spec: str | None, device: str | None, reporter: Reporter) -> LoadedModel:
    from ..engine import Engine

    with reporter.step(f"loading model {spec or 'default'}") as cb:
        engine = Engine.load(model=spec or "default", device=device, progress=cb)
    return LoadedModel(engine=engine, info=engine.describe(), path=engine.model_dir)


def read_image(path: str | Path, reporter: Reporter):
    from ..io import read_ct

    p = Path(path)
    with reporter.step(f"reading {p.name or p}") as cb:
        volume = read_ct(p)
        cb(1.0, f"{'x'.join(str(s) for s in volume.array.shape)} voxels")
    return volume


def split_prompt_args(prompts: Sequence[str] | None) -> list[str]:
    from ..prompts import split_prompts

    out: list[str] = []
    for p in prompts or []:
        if not isinstance(p, str) or not any(ch.isalnum() for ch in p):
            raise PromptError(f"empty prompt {p!r}; give text such as --prompt 'liver lesion'")
        out.extend(split_prompts(p))
    if not out:
        raise PromptError("no prompt given; use --prompt TEXT (several allowed)")
    return out


def get_encoding(model: LoadedModel, volume: Any, encoding_file: str | None, reporter: Reporter):
    from ..engine import Encoding

    if encoding_file:
        p = Path(encoding_file)
        if not p.exists():
            raise InputError(f"encoding file {p} does not exist")
        with reporter.step(f"loading encoding {p.name}") as cb:
            enc = Encoding.load(p, model.engine, volume=volume)  # checks model and volume
            cb(1.0, "")
        return enc
    with reporter.step("encoding") as cb:
        return model.engine.encode(volume, progress=cb)


def check_output_parent(out: str | Path, exports: bool = False) -> None:
    """Fail early (before minutes of work) when the output folder cannot be created/written, or
    (``exports``) when it holds a file of the user's where an export would go."""
    from ..exports.atomic import check_writable_dir

    p = Path(out).absolute()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent     # nothing is created yet: the nearest existing folder must accept files
    if not probe.is_dir():
        raise ExportError(f"output folder {p} is not writable: {probe} is a file, not a folder")
    check_writable_dir(probe, create=False)
    if exports:
        from ..exports.atomic import check_ours
        from ..exports.bundle import FIXED_FILES

        check_ours(p, FIXED_FILES)


def query_and_export(model: LoadedModel, enc: Any, volume: Any, prompts: list[str], out: Path,
                     reporter: Reporter, mask_threshold: float = 0.5, input_path: str | None = None,
                     extra: dict | None = None, absent_masks: bool = False):
    from ..cohort import answer_prompts
    from ..exports import export_all

    t0 = time.perf_counter()
    with reporter.step(f"querying {len(prompts)} prompt{'s' * (len(prompts) != 1)}") as cb:
        findings = answer_prompts(model.engine, enc, volume, prompts, mask_threshold, progress=cb,
                                  absent_masks=absent_masks)
    t_query = time.perf_counter() - t0
    t1 = time.perf_counter()
    with reporter.step("writing exports") as cb:
        result = export_all(volume, findings, out, model=model.info, input_path=input_path,
                            mask_threshold=mask_threshold,
                            extra={"timing_s": {"query": round(t_query, 3)},
                                   "requested_prompts": list(prompts), "absent_masks": bool(absent_masks),
                                   **(extra or {})},
                            progress=cb)
    result.timings.update(query=t_query, export=time.perf_counter() - t1)
    return findings, result


# Column names are those of findings.csv/json, report.html and the Slicer/web tables
# ("prompt confidence" is prompt_confidence everywhere). Headers wrap at spaces, never get cut:
# number columns get a fixed width (longest header word or value), text columns share the rest
# (fits 80 columns with the demo's extra column).
TABLE_COLUMNS = (("prompt", "left"), ("anatomy", "left"), ("finding", "left"),
                 ("probability", "right"), ("prompt confidence", "right"), ("volume (ml)", "right"))


def _term(key: Any) -> str:
    return str(key).replace("_", " ") if key else "—"


def _finding_cell(f: Any) -> str:
    """The finding, marked when the question was negated, judged absent or not understood."""
    if not f.understood:
        return "not understood" + (f" (try: {f.suggestions[0]})" if f.suggestions else "")
    name, side = f.finding, f.laterality
    cell = _term(name) + (f" ({side})" if name and side else "")
    if f.negated:
        cell = f"NO {cell}"
    if f.mask_suppressed:
        cell += " (judged absent: no mask)"
    return cell


def _value_legend(findings: Sequence[Any]) -> str:
    """What the numbers are, and which models made them (the table's caption)."""
    labels = dict.fromkeys(f"{f.score_label} by {f.score_model}" for f in findings
                           if f.probability is not None)
    masks = dict.fromkeys(f.mask_model for f in findings if f.mask_model)
    out = [f"probability: {', '.join(labels)}"] if labels else []
    if masks:
        out.append(f"masks by {', '.join(masks)}")
    return "; ".join(out)


def findings_table(findings: Sequence[Any], result: Any, title: str = "Findings",
                   extra: dict[str, list[str]] | None = None):
    from rich.table import Table

    rows = []
    for n, f in enumerate(findings):
        p = getattr(f, "probability", None)
        c = getattr(f, "prompt_confidence", None)
        v = getattr(f, "volume_ml", None)
        rows.append([str(f.prompt), _term(getattr(f, "anatomy", None)), _finding_cell(f),
                     "—" if p is None else f"{p:.2f}", "—" if c is None else f"{c:.2f}",
                     "—" if v is None else f"{v:.1f}",
                     *[str(vals[n]) for vals in (extra or {}).values()]])
    t = Table(title=title, show_lines=False, caption=_value_legend(findings) or None)
    for i, (col, just) in enumerate((*TABLE_COLUMNS, *((c, "left") for c in (extra or {})))):
        word = max(len(w) for w in col.split())
        if just == "right":  # numbers: fixed width
            t.add_column(col, justify="right", width=max([word] + [len(r[i]) for r in rows]))
        else:
            t.add_column(col, overflow="fold", min_width=word)
    for r in rows:
        t.add_row(*r)
    return t


def stdout_console():
    """Results (tables) go to stdout, progress and messages to stderr."""
    from rich.console import Console

    return Console()


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def mask_threshold(text: str | float) -> float:
    """The --mask-threshold value, or an InputError that says what is wrong with it."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise InputError(f"--mask-threshold must be a number between 0 and 1, not {text!r}") from None
    if not 0.0 < v < 1.0:  # also false for nan
        raise InputError(f"--mask-threshold must lie strictly between 0 and 1 (e.g. 0.5), not {text}")
    return v


# ============================================================================ commands

def cmd_encode(args) -> int:
    reporter = Reporter(args.quiet)
    out = Path(args.out)
    check_output_parent(out.parent if str(out.parent) else Path("."))
    volume = read_image(args.image, reporter)
    model = load_model(args.model, args.device, reporter)
    with reporter.step("encoding") as cb:
        enc = model.engine.encode(volume, progress=cb)
    try:
        enc.save(out)  # atomic (temporary file + rename) in the engine
    except OSError as exc:
        raise ExportError(f"could not write the encoding {out}: {exc.strerror or exc}") from None
    reporter.info(f"encoding written to [bold]{out}[/bold]")
    return 0


def cmd_query(args) -> int:
    reporter = Reporter(args.quiet)
    threshold = mask_threshold(args.mask_threshold)
    prompts = split_prompt_args(args.prompt)
    check_output_parent(args.out, exports=True)
    volume = read_image(args.image, reporter)
    model = load_model(args.model, args.device, reporter)
    enc = get_encoding(model, volume, args.encoding, reporter)
    findings, result = query_and_export(model, enc, volume, prompts, Path(args.out), reporter,
                                        mask_threshold=threshold, absent_masks=args.absent_masks,
                                        input_path=str(args.image))
    if args.json:
        print_json(json.loads(result.files["findings.json"].read_text(encoding="utf-8")))
    elif not args.quiet:
        stdout_console().print(findings_table(findings, result))
    if not args.quiet:
        reporter.info(f"exports written to [bold]{result.out_dir}[/bold]: "
                      + ", ".join(sorted(result.files)) + ", masks/")
    return 0


# ============================================================================ argparse

def _add_model_args(p) -> None:
    p.add_argument("--model", default="default",
                   help="catalog id (see `ctlanguage models list`) or a model folder; default: the embedded model")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="force the device (default: CUDA when available, else CPU)")
    p.add_argument("--allow-download", action=_AllowDownload, nargs=0,
                   help="let a published model's package fetch its weights on first use (e.g. "
                        "TotalSegmentator, ~0.25 GB); without it a missing model says how to get it")


class _AllowDownload(argparse.Action):
    """--allow-download: the user's consent, passed to backends as CTLANGUAGE_ALLOW_DOWNLOADS=1."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..catalog import allow_downloads

        allow_downloads()
        setattr(namespace, self.dest, True)


def add_threshold_arg(p) -> None:
    # checked by the handler (mask_threshold), so a bad value is one sentence, not a usage dump
    p.add_argument("--mask-threshold", default="0.5", metavar="X",
                   help="probability above which a voxel is in the mask, strictly between 0 and 1 "
                        "(default 0.5)")
    p.add_argument("--absent-masks", action="store_true",
                   help="draw masks also for findings judged absent (default: a finding whose "
                        "probability is below 0.5, or whose uncalibrated score is below its model's "
                        "zero-shot decision point, gets an empty mask)")


def add_json_arg(p, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode a CT once and save the encoding for later queries",
                              description="Encode IMAGE (NIfTI/NRRD/MHA file or DICOM folder) and save the encoding.")
    p.add_argument("image", help="CT image file or DICOM folder")
    p.add_argument("--out", required=True, help="encoding file to write")
    _add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser("query", help="answer prompts on a CT and write masks, tables, SEG and report",
                              description="Answer free-text prompts on IMAGE and write all exports into DIR.")
    p.add_argument("image", help="CT image file (NIfTI/NRRD/MHA) or DICOM folder")
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help="free-text prompt (repeat, or separate several with ';')")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--encoding", metavar="FILE", help="reuse an encoding made by `ctlanguage encode`")
    add_threshold_arg(p)
    add_json_arg(p, "findings.json (instead of the table)")
    _add_model_args(p)
    p.set_defaults(func=cmd_query)
