"""Cohorts: cases from a manifest or folder, one output folder per case, and a summary —
on one process, as Slurm/Kubernetes array shards, or as Ray tasks on a cluster.

A run folder belongs to one *run*: the model (id + sha256), prompts and thresholds, recorded in
``run.json``. Re-running with the same run resumes (finished cases are skipped); a different run
in the same folder is refused unless forced, so earlier results are never silently replaced. An
interrupted run still writes the summary of what finished, with how to resume.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io as _io
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import CTLanguageError, InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
RUN_FILE = "run.json"
SUMMARY_FIELDS = ["case_id", "image", "status", "seconds", "attempts", "n_findings", "output", "error"]


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path


@dataclass(frozen=True)
class RunSpec:
    """What makes two runs the same run."""

    model_id: str
    model_sha256: str
    prompts: tuple
    mask_threshold: float = 0.5
    presence_threshold: float = 0.5
    absent_masks: bool = False          # masks also for findings judged absent

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        return d

    def differences(self, other: dict) -> list[str]:
        mine = self.to_dict()
        defaults = {f.name: f.default for f in fields(self)}   # runs recorded before a field existed
        return [k for k in mine if mine[k] != other.get(k, defaults[k])]


# ------------------------------------------------------------------------------------ cases
def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)


def _has_dicom(folder: Path) -> bool:
    for p in folder.rglob("*"):
        if p.is_file():
            if p.suffix.lower() == ".dcm":
                return True
            with contextlib.suppress(OSError):
                with open(p, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
    return False


def _case_id_from(p: Path) -> str:
    name = p.name
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def discover_cases(source: str | Path) -> list[Case]:
    """Cases from a manifest (.jsonl lines with "image" and optional "case_id", or a .csv with an
    "image" column; paths relative to the manifest) or a folder (each image file, each folder
    holding one image or a DICOM series)."""
    src = Path(source)
    if not src.exists():
        raise InputError(f"{src} does not exist")
    cases: list[Case] = []
    if src.is_file():
        if src.suffix.lower() == ".csv":
            with open(src, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            from .manifest import read_manifest

            rows = read_manifest(src)
        for n, row in enumerate(rows, 1):
            if not row.get("image"):
                raise InputError(f"entry {n} of {src.name} has no 'image'")
            img = Path(row["image"])
            img = img if img.is_absolute() else src.parent / img
            cases.append(Case(str(row.get("case_id") or _case_id_from(img)), img))
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


def parse_shard(spec: Optional[str]) -> Optional[tuple]:
    """"I/N" (0 <= I < N, as $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) -> (I, N)."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise InputError(f"--shard must look like I/N (e.g. 0/4), not {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {spec}: I must satisfy 0 <= I < N")
    return i, n


def select_shard(cases: Sequence[Case], shard: Optional[tuple]) -> list[Case]:
    """Every N-th case from the I-th (stable for the same manifest, disjoint, complete)."""
    if shard is None:
        return list(cases)
    i, n = shard
    return list(cases[i::n])


# ------------------------------------------------------------------------------- run folder
def prepare_run(out: Path, spec: RunSpec, force: bool = False) -> None:
    """Claim ``out`` for this run (run.json); refuse a folder that holds another run."""
    from .exports.atomic import atomic_write_bytes, check_writable_dir

    check_writable_dir(out)
    path = out / RUN_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        diff = spec.differences(old.get("spec") or {})
        if diff and not force:
            raise InputError(
                f"{out} holds a run with other {', '.join(diff)} ({path}); use a new --out folder, "
                "or --force to replace its results")
        if not diff:
            return
    doc = {"format": "ctlanguage-run/1", "spec": spec.to_dict(),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))


def finished(out: Path, case: Case, spec: RunSpec) -> Optional[dict]:
    """The findings document of a case this run already finished, else None."""
    p = out / case.case_id / "findings.json"
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = doc.get("model") or {}
    same = (doc.get("requested_prompts") == list(spec.prompts)
            and model.get("sha256") == spec.model_sha256
            and doc.get("mask_threshold") == spec.mask_threshold)
    return doc if same else None


# ----------------------------------------------------------------------------- one case
def answer_prompts(engine, enc, volume, prompts: Sequence[str], mask_threshold: float = 0.5,
                   presence_threshold: float = 0.5, progress: Optional[Callable] = None,
                   absent_masks: bool = False) -> list:
    findings = []
    for i, prompt in enumerate(prompts):
        findings.extend(engine.query(enc, prompt, mask_threshold=mask_threshold, volume=volume,
                                     presence_threshold=presence_threshold, absent_masks=absent_masks))
        if progress:
            progress((i + 1) / len(prompts), prompt[:40])
    return findings


def run_case(engine, case: Case, out: Path, spec: RunSpec) -> dict:
    """Read, encode, answer and export one case; a summary row (never raises for the case)."""
    from .exports import export_all
    from .io import read_ct

    t0 = time.perf_counter()
    try:
        volume = read_ct(case.image)
        enc = engine.encode(volume)
        tq = time.perf_counter()
        findings = answer_prompts(engine, enc, volume, spec.prompts, spec.mask_threshold,
                                  spec.presence_threshold, absent_masks=spec.absent_masks)
        export_all(volume, findings, out / case.case_id, model=engine.describe(),
                   input_path=str(case.image), mask_threshold=spec.mask_threshold,
                   extra={"timing_s": {"query": round(time.perf_counter() - tq, 3)},
                          "requested_prompts": list(spec.prompts), "absent_masks": spec.absent_masks,
                          "case_id": case.case_id})
        doc = json.loads((out / case.case_id / "findings.json").read_text(encoding="utf-8"))
        return summary_row(case, "ok", time.perf_counter() - t0, doc, output=out / case.case_id)
    except CTLanguageError as exc:
        return summary_row(case, "failed", time.perf_counter() - t0, None, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the cohort
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return summary_row(case, "failed", time.perf_counter() - t0, None, error=msg)


# ------------------------------------------------------------------------------- summary
def summary_row(case: Case, status: str, seconds: Optional[float], doc: Optional[dict],
                error: str = "", output: Optional[Path] = None, attempts: int = 1) -> dict:
    row = {"case_id": case.case_id, "image": str(case.image), "status": status,
           "seconds": "" if seconds is None else f"{seconds:.2f}", "attempts": str(attempts),
           "n_findings": "", "output": str(output) if output else "", "error": error}
    for f in (doc or {}).get("findings", []):
        p, v = f.get("probability"), f.get("volume_ml")
        row[f"p:{f.get('prompt')}"] = "" if p is None else f"{p:.4f}"
        row[f"ml:{f.get('prompt')}"] = "" if v is None else f"{v:.3f}"
    if doc:
        row["n_findings"] = str(len(doc.get("findings", [])))
    return row


def write_summary(out: Path, rows: Sequence[dict], spec: RunSpec, cases: Sequence[Case],
                  complete: bool, name: str = "summary", cohort: Optional[Sequence[Case]] = None) -> Path:
    """``<name>.csv`` (one row per case, in manifest order) and ``<name>.json`` (the run, the
    counts, whether it is complete and how to resume; for a shard, the whole cohort's order).
    Written atomically."""
    from .exports.atomic import atomic_write_bytes

    order = {c.case_id: i for i, c in enumerate(cohort or cases)}
    rows = sorted(rows, key=lambda r: order.get(r["case_id"], len(order)))
    fields = list(SUMMARY_FIELDS)
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / f"{name}.csv", buf.getvalue().encode("utf-8"))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    counts["not_run"] = len(cases) - len(rows)
    doc = {"format": "ctlanguage-batch-summary/1", "spec": spec.to_dict(), "cases": len(cases),
           "counts": counts, "complete": bool(complete),
           "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if not complete:
        doc["resume"] = "run the same command again: finished cases are skipped"
    if cohort is not None:
        doc["cohort_order"] = [c.case_id for c in cohort]
    atomic_write_bytes(out / f"{name}.json", (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    return out / f"{name}.csv"


def merge_summaries(out: Path) -> tuple:
    """One summary from the shard summaries in ``out`` (``summary.shard-*.csv``): (rows, spec)."""
    parts = sorted(out.glob("summary.shard-*.json"))
    if not parts:
        raise InputError(f"no shard summaries (summary.shard-*.json) in {out}")
    specs = {json.dumps(json.loads(p.read_text())["spec"], sort_keys=True) for p in parts}
    if len(specs) != 1:
        raise InputError(f"the shard summaries in {out} come from different runs")
    rows: list = []
    for p in parts:
        with open(p.with_suffix(".csv"), encoding="utf-8", newline="") as fh:
            rows += list(csv.DictReader(fh))
    order = json.loads(parts[0].read_text()).get("cohort_order") or []
    rank = {cid: i for i, cid in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r["case_id"], len(rank)))
    d = json.loads(specs.pop())
    spec = RunSpec(**{**d, "prompts": tuple(d["prompts"])})
    return rows, spec


# ------------------------------------------------------------------------------ executors
def run_local(engine, todo: Sequence[Case], out: Path, spec: RunSpec,
              on_case: Optional[Callable[[dict], None]] = None) -> list:
    """Cases one after the other in this process (one engine, loaded once)."""
    rows = []
    for c in todo:
        row = run_case(engine, c, out, spec)
        rows.append(row)
        if on_case:
            on_case(row)
    return rows


def run_ray(model: str, device: Optional[str], todo: Sequence[Case], out: Path, spec: RunSpec,
            address: Optional[str] = None, workers: Optional[int] = None, retries: int = 2,
            on_case: Optional[Callable[[dict], None]] = None) -> list:
    """Cases as Ray tasks on actors that each load the engine once. A case whose worker died is
    retried (up to ``retries`` more times) on another worker; a case that fails with an error is
    recorded, not retried (the error is the input's)."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'ctlanguage[cluster]'") from None
    started = False
    if not ray.is_initialized():
        kw = {"address": None if address in (None, "local") else address,
              "log_to_driver": False, "include_dashboard": False}
        if kw["address"] is None and workers:
            kw["num_cpus"] = int(workers)
        ray.init(**kw)
        started = True
    try:
        n = int(workers or max(1, int(ray.available_resources().get("CPU", 1))))
        Worker = ray.remote(num_cpus=1, max_restarts=retries)(_RayWorker)
        actors = [Worker.remote(model, device, str(out), spec.to_dict()) for _ in range(n)]
        pending: dict = {}
        queue = [(c, 1) for c in todo]
        free = list(actors)
        rows = []
        while queue or pending:
            while queue and free:
                case, attempt = queue.pop(0)
                actor = free.pop(0)
                pending[actor.run.remote(case.case_id, str(case.image))] = (case, attempt, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            case, attempt, actor = pending.pop(ref)
            try:
                row = ray.get(ref)
                row["attempts"] = str(attempt)
                free.append(actor)
            except ray.exceptions.RayError as exc:   # the worker died (or the cluster lost it)
                free.append(actor)                    # restarted by Ray (max_restarts)
                if attempt <= retries:
                    queue.append((case, attempt + 1))
                    continue
                row = summary_row(case, "failed", None, None, attempts=attempt,
                                  error=f"worker lost after {attempt} attempts: {type(exc).__name__}")
            rows.append(row)
            if on_case:
                on_case(row)
        return rows
    finally:
        if started:
            ray.shutdown()


class _RayWorker:
    """One engine per Ray worker process, loaded once."""

    def __init__(self, model: str, device: Optional[str], out: str, spec: dict):
        from .engine import Engine

        self.engine = Engine.load(model, device=device)
        self.out = Path(out)
        self.spec = RunSpec(**{**spec, "prompts": tuple(spec["prompts"])})

    def run(self, case_id: str, image: str) -> dict:
        return run_case(self.engine, Case(case_id, Path(image)), self.out, self.spec)
