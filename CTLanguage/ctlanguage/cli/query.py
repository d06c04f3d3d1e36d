"""`ctlanguage encode`, `ctlanguage query` and `ctlanguage batch` (see docs/cli.md).

These are thin wrappers: read the image (``io.read_ct``), load the model (``catalog`` resolves
ID/PATH, ``engine.Engine`` runs it), encode once, query all prompts, write every export
all-or-nothing (``exports.export_all``). Errors are CTLanguageError subclasses; the main CLI turns
them into one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import CTLanguageError, ExportError, InputError, PromptError

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


def encoding_volume_hash(enc: Any) -> str | None:
    for name in ("volume_hash", "content_hash", "volume_sha256"):
        v = getattr(enc, name, None)
        if isinstance(v, str) and v:
            return v
    meta = getattr(enc, "metadata", None) or getattr(enc, "meta", None)
    if isinstance(meta, dict):
        for name in ("volume_hash", "content_hash", "volume_sha256"):
            if meta.get(name):
                return str(meta[name])
    return None


def get_encoding(model: LoadedModel, volume: Any, encoding_file: str | None, reporter: Reporter):
    from ..engine import Encoding

    if encoding_file:
        p = Path(encoding_file)
        if not p.exists():
            raise InputError(f"encoding file {p} does not exist")
        with reporter.step(f"loading encoding {p.name}") as cb:
            enc = Encoding.load(p, model.engine, volume=volume)  # checks model and volume
            cb(1.0, "")
        h = encoding_volume_hash(enc)
        if h is not None and h != volume.content_hash():
            raise InputError(
                f"the encoding {p.name} was computed from a different volume than "
                f"{volume.source or 'the input image'}; encode this image first")
        return enc
    with reporter.step("encoding") as cb:
        return model.engine.encode(volume, progress=cb)


def check_output_parent(out: str | Path) -> None:
    """Fail early (before minutes of work) when the output folder cannot be created/written."""
    from ..exports.atomic import check_writable_dir

    p = Path(out).absolute()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent     # nothing is created yet: the nearest existing folder must accept files
    try:
        check_writable_dir(probe, create=False)
    except ExportError as exc:
        raise ExportError(f"output folder {p} is not writable ({exc})") from None


def query_and_export(model: LoadedModel, enc: Any, volume: Any, prompts: list[str], out: Path,
                     reporter: Reporter, mask_threshold: float = 0.5, input_path: str | None = None,
                     extra: dict | None = None):
    from ..exports import export_all

    t0 = time.perf_counter()
    with reporter.step(f"querying {len(prompts)} prompt{'s' * (len(prompts) != 1)}") as cb:
        findings = []
        for i, prompt in enumerate(prompts):
            findings.extend(model.engine.query(enc, prompt, mask_threshold=mask_threshold, volume=volume))
            cb((i + 1) / len(prompts), prompt[:40])
    t_query = time.perf_counter() - t0
    t1 = time.perf_counter()
    with reporter.step("writing exports") as cb:
        result = export_all(volume, findings, out, model=model.info, input_path=input_path,
                            mask_threshold=mask_threshold,
                            extra={"timing_s": {"query": round(t_query, 3)},
                                   "requested_prompts": list(prompts), **(extra or {})},
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
    name, side = getattr(f, "finding", None), getattr(f, "laterality", None)
    return _term(name) + (f" ({side})" if name and side else "")


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
    t = Table(title=title, show_lines=False)
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
    check_output_parent(args.out)
    volume = read_image(args.image, reporter)
    model = load_model(args.model, args.device, reporter)
    enc = get_encoding(model, volume, args.encoding, reporter)
    findings, result = query_and_export(model, enc, volume, prompts, Path(args.out), reporter,
                                        mask_threshold=threshold,
                                        input_path=str(args.image))
    if args.json:
        print_json(json.loads(result.files["findings.json"].read_text(encoding="utf-8")))
    elif not args.quiet:
        stdout_console().print(findings_table(findings, result))
    if not args.quiet:
        reporter.info(f"exports written to [bold]{result.out_dir}[/bold]: "
                      + ", ".join(sorted(result.files)) + ", masks/")
    return 0


# ---------------------------------------------------------------------------- batch

@dataclass
class Case:
    case_id: str
    image: Path
    extra: dict = field(default_factory=dict)


def _is_image_file(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and name.endswith(IMAGE_SUFFIXES)


def _has_dicom(folder: Path) -> bool:
    for p in folder.rglob("*"):
        if p.is_file():
            with contextlib.suppress(OSError):
                with open(p, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            if p.suffix.lower() == ".dcm":
                return True
    return False


def _case_id_from(p: Path) -> str:
    name = p.name
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def discover_cases(source: str | Path) -> list[Case]:
    """Cases from a manifest (.jsonl/.json lines with "image" and optional "case_id"; or .csv
    with an "image" column) or from a folder (each image file / each DICOM sub-folder)."""
    src = Path(source)
    if not src.exists():
        raise InputError(f"{src} does not exist")
    cases: list[Case] = []
    if src.is_file():
        base = src.parent
        text = src.read_text(encoding="utf-8")
        rows: list[dict] = []
        if src.suffix.lower() == ".csv":
            rows = list(csv.DictReader(_io.StringIO(text)))
        else:
            from ..manifest import read_manifest

            rows = read_manifest(src)
        for n, row in enumerate(rows, 1):
            if not row.get("image"):
                raise InputError(f"entry {n} of {src.name} has no 'image'")
            img = Path(row["image"])
            img = img if img.is_absolute() else base / img
            cid = str(row.get("case_id") or _case_id_from(img))
            cases.append(Case(cid, img))
    else:
        for p in sorted(src.iterdir()):
            if p.name.startswith("."):
                continue
            if _is_image_file(p):
                cases.append(Case(_case_id_from(p), p))
            elif p.is_dir():
                imgs = sorted(q for q in p.iterdir() if _is_image_file(q))
                ct = [q for q in imgs if _case_id_from(q) in ("ct", "image", "volume")]
                if ct or len(imgs) == 1:
                    cases.append(Case(p.name, (ct or imgs)[0]))
                elif _has_dicom(p):
                    cases.append(Case(p.name, p))
    if not cases:
        raise InputError(f"no CT images or DICOM folders found in {src}")
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(f"case ids are not unique in {src}: {', '.join(dupes[:5])}")

    for c in cases:
        if c.case_id in ("", ".", "..") or any(ch in c.case_id for ch in "/\\"):
            raise InputError(f"case id {c.case_id!r} cannot be used as a folder name")
    return cases


def _summary_row(case: Case, status: str, seconds: float | None, doc: dict | None, error: str = "") -> dict:
    row = {"case_id": case.case_id, "image": str(case.image), "status": status,
           "seconds": "" if seconds is None else f"{seconds:.2f}", "error": error,
           "n_findings": "", "output": ""}
    if doc:
        row["n_findings"] = str(len(doc.get("findings", [])))
        for f in doc.get("findings", []):
            p = f.get("probability")
            row[f"p:{f.get('prompt')}"] = "" if p is None else f"{p:.4f}"
            v = f.get("volume_ml")
            row[f"ml:{f.get('prompt')}"] = "" if v is None else f"{v:.3f}"
    return row


def cmd_batch(args) -> int:
    from ..exports.atomic import atomic_write_bytes, check_writable_dir, recover

    reporter = Reporter(args.quiet)
    threshold = mask_threshold(args.mask_threshold)
    prompts = split_prompt_args(args.prompt)
    cases = discover_cases(args.source)
    out = Path(args.out)
    check_writable_dir(out)
    rows: list[dict] = []
    todo = []
    for c in cases:
        if (out / c.case_id).is_dir():
            recover(out / c.case_id)  # finish or drop an export of a killed earlier run
        done_json = out / c.case_id / "findings.json"
        if done_json.is_file() and not args.force:
            doc = None
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(done_json.read_text(encoding="utf-8"))
            done_prompts = (doc or {}).get("requested_prompts") or [
                f.get("prompt") for f in (doc or {}).get("findings", [])]
            if doc is not None and done_prompts == prompts:
                rows.append(_summary_row(c, "skipped", None, doc) | {"output": str(done_json.parent)})
                continue
        todo.append(c)
    reporter.info(f"{len(cases)} cases: {len(cases) - len(todo)} already done, {len(todo)} to run")
    model = load_model(args.model, args.device, reporter) if todo else None
    failed = 0
    quiet_steps = Reporter(quiet=True)
    if todo:
        with reporter.step("batch") as overall:
            for n, c in enumerate(todo):
                t0 = time.perf_counter()
                overall(n / len(todo), c.case_id)
                try:
                    volume = read_image(c.image, quiet_steps)
                    with quiet_steps.step("encoding") as cb:
                        enc = model.engine.encode(volume, progress=cb)  # type: ignore[union-attr]
                    _, result = query_and_export(model, enc, volume, prompts, out / c.case_id,  # type: ignore[arg-type]
                                                 quiet_steps, mask_threshold=threshold,
                                                 input_path=str(c.image), extra={"case_id": c.case_id})
                    doc = json.loads((out / c.case_id / "findings.json").read_text(encoding="utf-8"))
                    rows.append(_summary_row(c, "ok", time.perf_counter() - t0, doc)
                                | {"output": str(out / c.case_id)})
                except CTLanguageError as exc:
                    failed += 1
                    rows.append(_summary_row(c, "failed", time.perf_counter() - t0, None, str(exc)))
                    reporter.info(f"[red]failed[/red] {c.case_id}: {exc}")
                except Exception as exc:  # noqa: BLE001 - one bad case must not stop the cohort
                    failed += 1
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    rows.append(_summary_row(c, "failed", time.perf_counter() - t0, None, msg))
                    reporter.info(f"[red]failed[/red] {c.case_id}: {msg}")
                overall((n + 1) / len(todo), c.case_id)
    order = {c.case_id: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[r["case_id"]])
    fields = ["case_id", "image", "status", "seconds", "n_findings", "output", "error"]
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    try:
        atomic_write_bytes(out / "summary.csv", buf.getvalue().encode("utf-8"))
    except OSError as exc:
        raise ExportError(f"could not write {out / 'summary.csv'}: {exc.strerror or exc}") from None
    if args.json:
        print_json(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    reporter.info(f"batch finished: {ok} ok, {skipped} skipped, {failed} failed; "
                  f"summary: [bold]{out / 'summary.csv'}[/bold]")
    if failed:
        print(f"error: {failed} of {len(cases)} cases failed; see {out / 'summary.csv'}", file=sys.stderr)
        return 1
    return 0


# ============================================================================ argparse

def _add_model_args(p) -> None:
    p.add_argument("--model", default="default",
                   help="catalog id (see `ctlanguage models list`) or a model folder; default: the embedded model")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="force the device (default: CUDA when available, else CPU)")


def add_threshold_arg(p) -> None:
    # checked by the handler (mask_threshold), so a bad value is one sentence, not a usage dump
    p.add_argument("--mask-threshold", default="0.5", metavar="X",
                   help="probability above which a voxel is in the mask, strictly between 0 and 1 "
                        "(default 0.5)")


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

    p = subparsers.add_parser("batch", help="run prompts over a cohort (manifest or folder), resumable",
                              description="Run the prompts on every case of MANIFEST (.jsonl/.csv) or FOLDER; "
                                          "finished cases are skipped, failures are recorded in DIR/summary.csv.")
    p.add_argument("source", metavar="MANIFEST|FOLDER")
    p.add_argument("--prompt", "-p", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR")
    add_threshold_arg(p)
    add_json_arg(p, "the rows of summary.csv")
    p.add_argument("--force", action="store_true", help="re-run cases that are already finished")
    _add_model_args(p)
    p.set_defaults(func=cmd_batch)
