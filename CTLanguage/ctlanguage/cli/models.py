"""`ctlanguage models list|verify|download` (see docs/cli.md)."""

from __future__ import annotations

import json
import sys

from ..errors import CTLanguageError


def _status(entry) -> tuple[str, str]:
    from .. import catalog

    if entry.embedded and catalog.embedded_model_dir(entry).is_dir():
        return "embedded", str(catalog.embedded_model_dir(entry))
    if entry.embedded and (entry.url or "").startswith("embedded:"):
        return "missing", ""
    d = catalog.cached_model_dir(entry)
    if (d / catalog.WEIGHTS).is_file():
        return "cached", str(d)
    return "not downloaded", ""


def _size(n) -> str:
    if not n:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def cmd_list(args) -> int:
    from .. import catalog
    from ..model_choices import DEVICE_TEXT, catalog_choices

    entries = catalog.load_catalog(args.catalog)
    choices = catalog_choices(entries)
    if args.json:
        out = []
        for e, c in zip(entries, choices):
            st, path = _status(e)
            out.append(e.to_dict() | {"status": c.where, "local_path": path or None,
                                      "capabilities": list(c.can_do), "device": c.device,
                                      "available": c.available, "how_to_get": c.hint or None,
                                      "notice": c.notice or None})
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"CTLanguage models and pipelines (cache: {catalog.cache_dir()})")
    for col in ("id", "can do", "licence", "size", "runs on", "on disk"):
        t.add_column(col, overflow="fold")
    for i, (e, c) in enumerate(zip(entries, choices)):
        name = e.id + (" *" if i == 0 else "")
        if e.pipeline:
            name += "\n" + ", ".join(f"{r}: {m}" for r, m in e.pipeline.items())
        size = _size(e.size) if e.size else str(e.extra.get("download_size") or "—")
        t.add_row(name, ", ".join(c.can_do) or "—", e.license or "—", size,
                  DEVICE_TEXT.get(c.device, c.device or "CPU"), c.where)
    Console().print(t)
    for c in choices:
        if not c.available and c.hint:
            print(f"{c.spec}: {c.hint}")
    print("* default model. `ctlanguage models list --json` shows every field "
          "(description, intended use, metrics, how to get the weights).")
    return 0


def cmd_verify(args) -> int:
    from .. import catalog

    entries = catalog.load_catalog(args.catalog)
    targets = args.models or [e.id for e in entries if _status(e)[0] in ("embedded", "cached")]
    failures = 0
    for spec in targets:
        try:
            path, entry = catalog.resolve_model(spec, catalog=entries)
            if path is None:  # another family: its converted folder in the cache (Merlin), if any
                path = catalog.cached_model_dir(entry)
                if not (path / catalog.WEIGHTS).is_file():
                    raise CTLanguageError(f"{entry.id} has no model folder in the cache; run "
                                          f"`ctlanguage models download {entry.id}`")
            summary = catalog.verify_model_dir(path, entry)
            if args.deep:
                from ..engine import Engine

                Engine.load(model=entry.id if entry is not None and entry.backend != "grounded"
                            else str(path), device="cpu")
            name = f"{entry.id} {entry.version}" if entry else str(path)
            if not args.quiet:
                print(f"ok      {name}: {summary['tensors']} tensors, "
                      f"sha256 {summary['weights_sha256'][:16]}…  ({path})")
        except CTLanguageError as exc:
            failures += 1
            print(f"error: {spec}: {exc}", file=sys.stderr)
    if not targets:
        print("error: no model is available locally; see `ctlanguage models list`", file=sys.stderr)
        return 2
    return 2 if failures else 0


def cmd_download(args) -> int:
    from .. import catalog
    from .query import Reporter

    entries = catalog.load_catalog(args.catalog)
    entry = catalog.find_entry(args.model, entries)
    if entry is None:
        raise CTLanguageError(f"unknown model {args.model!r}; known: {', '.join(e.id for e in entries)}")
    reporter = Reporter(args.quiet)
    if args.accept_licence and (entry.backend or "grounded") != "fvlm":
        raise CTLanguageError(f"--accept-licence applies to models that ask for it (fvlm), not {entry.id}")
    local = {k: v for k, v in (("source", args.source), ("tokenizer", args.tokenizer),
                               ("accept_licence", args.accept_licence)) if v}
    with reporter.bytes_progress(f"{entry.id} {entry.version}") as cb:
        path = catalog.fetch(entry, progress=cb, force=args.force, **local)
    if not args.quiet:
        print(f"ok      {entry.id} {entry.version} verified in {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list, verify or download models from the catalog",
                              description="Model catalog: embedded default + downloadable models "
                                          "cached in $CTLANGUAGE_CACHE (default ~/.cache/ctlanguage).")
    p.add_argument("--catalog", default=None, help="catalog JSON to use (default: Resources/catalog.json "
                                                   "or $CTLANGUAGE_CATALOG)")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    q = sub.add_parser("list", help="show the catalog and what is available locally")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)
    q = sub.add_parser("verify", help="check hashes and structure of local models")
    q.add_argument("models", nargs="*", help="ids or folders (default: every local model)")
    q.add_argument("--deep", action="store_true", help="also load the network (checks tensor shapes)")
    q.set_defaults(func=cmd_verify)
    q = sub.add_parser("download", help="download a model into the cache (resumable, sha256-verified)")
    q.add_argument("model", help="catalog id")
    q.add_argument("--force", action="store_true", help="download again even when cached")
    q.add_argument("--from", dest="source", metavar="FILE", default=None,
                   help="use a local copy of the published checkpoint instead of downloading it")
    q.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="local folder with the text model's tokenizer files (Merlin: "
                        "Clinical-Longformer's vocab.json and merges.txt; fVLM: CXR-BERT's vocab.txt)")
    q.add_argument("--accept-licence", action="store_true",
                   help="confirm a model's terms where it asks (fVLM: no licence file, trained on "
                        "non-commercial CT-RATE data)")
    q.set_defaults(func=cmd_download)

    def _help(args, _p=p) -> int:
        _p.print_help()
        return 1

    p.set_defaults(func=_help)
