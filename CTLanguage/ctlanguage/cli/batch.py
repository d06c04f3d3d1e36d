"""`ctlanguage batch SOURCE --prompt ... --out DIR [--ray [ADDRESS]] [--shard I/N]` and
`ctlanguage batch merge DIR`: cohorts on one process, on a Ray cluster, or as array-job shards
(see docs/cli.md "batch" and docs/cluster.md). The work itself is ``ctlanguage.cohort``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..errors import InputError


def _interrupt(signum, frame):  # SIGTERM (Slurm preemption, kill): like Ctrl-C
    raise KeyboardInterrupt


def cmd_batch(args) -> int:
    from .. import cohort
    from ..exports.atomic import recover
    from .query import Reporter, load_model, mask_threshold, print_json, split_prompt_args

    if args.source and args.source[0] == "merge":
        return cmd_merge(args)
    if len(args.source) != 1:
        raise InputError("give one MANIFEST or FOLDER (or `batch merge DIR`)")
    if not args.prompt or not args.out:
        raise InputError("give at least one --prompt and --out DIR")
    reporter = Reporter(args.quiet)
    threshold = mask_threshold(args.mask_threshold)
    prompts = split_prompt_args(args.prompt)
    shard = cohort.parse_shard(args.shard)
    all_cases = cohort.discover_cases(args.source[0])
    cases = cohort.select_shard(all_cases, shard)
    out = Path(args.out)
    model = load_model(args.model, args.device, reporter)
    info = model.info
    spec = cohort.RunSpec(model_id=info["id"], model_sha256=info["sha256"], prompts=tuple(prompts),
                          mask_threshold=threshold, absent_masks=args.absent_masks)
    cohort.prepare_run(out, spec, force=args.force)
    rows, todo = [], []
    for c in cases:
        if (out / c.case_id).is_dir():
            recover(out / c.case_id)  # finish or drop an export of a killed earlier run
        doc = None if args.force else cohort.finished(out, c, spec)
        if doc is not None:
            rows.append(cohort.summary_row(c, "skipped", None, doc, output=out / c.case_id))
        else:
            todo.append(c)
    name = "summary" if shard is None else f"summary.shard-{shard[0]}-of-{shard[1]}"
    where = f" (shard {shard[0]}/{shard[1]} of {len(all_cases)})" if shard else ""
    reporter.info(f"{len(cases)} cases{where}: {len(cases) - len(todo)} already done, "
                  f"{len(todo)} to run")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    complete = False
    try:
        with reporter.step("batch") as overall:
            def on_case(row):
                rows.append(row)
                overall(sum(r["status"] != "skipped" for r in rows) / max(len(todo), 1), row["case_id"])
                if row["status"] == "failed":
                    reporter.info(f"[red]failed[/red] {row['case_id']}: {row['error']}")

            if todo and args.ray is not None:
                cohort.run_ray(args.model, args.device, todo, out, spec, address=args.ray or None,
                               workers=args.workers, retries=args.retries, on_case=on_case)
            elif todo:
                cohort.run_local(model.engine, todo, out, spec, on_case=on_case)
        complete = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary = cohort.write_summary(out, rows, spec, cases, complete, name=name,
                                       cohort=all_cases if shard else None)
        if not complete:
            print(f"interrupted: {len(rows)} of {len(cases)} cases are in {summary}; run the same "
                  "command again to resume", file=sys.stderr)
    if args.json:
        print_json(rows)
    failed = sum(r["status"] == "failed" for r in rows)
    ok = sum(r["status"] == "ok" for r in rows)
    reporter.info(f"batch finished: {ok} ok, {len(rows) - ok - failed} skipped, {failed} failed; "
                  f"summary: [bold]{summary}[/bold]")
    if failed:
        print(f"error: {failed} of {len(cases)} cases failed; see {summary}", file=sys.stderr)
        return 1
    return 0


def cmd_merge(args) -> int:
    from .. import cohort
    from .query import Reporter

    if len(args.source) != 2:
        raise InputError("usage: ctlanguage batch merge DIR (the --out folder of the shards)")
    out = Path(args.source[1])
    rows, spec = cohort.merge_summaries(out)
    cases = [cohort.Case(r["case_id"], Path(r["image"])) for r in rows]
    summary = cohort.write_summary(out, rows, spec, cases, complete=True)
    Reporter(args.quiet).info(f"{len(rows)} cases merged into [bold]{summary}[/bold]")
    return 0


def register(subparsers) -> None:
    from .query import _add_model_args, add_json_arg, add_threshold_arg

    p = subparsers.add_parser(
        "batch", help="run prompts over a cohort (manifest or folder), resumable; Ray or shards",
        description="Run the prompts on every case of MANIFEST (.jsonl/.csv) or FOLDER, one output "
                    "folder per case and DIR/summary.csv. Finished cases are skipped; a folder that "
                    "holds another run (model, prompts, thresholds) is refused unless --force. "
                    "`ctlanguage batch merge DIR` joins the summaries of --shard runs.")
    p.add_argument("source", nargs="+", metavar="MANIFEST|FOLDER", help="or: merge DIR")
    p.add_argument("--prompt", "-p", action="append", help="prompt (repeatable)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    add_threshold_arg(p)
    add_json_arg(p, "the rows of summary.csv")
    p.add_argument("--force", action="store_true",
                   help="re-run finished cases and replace a different earlier run in DIR")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run cases as Ray tasks: on the cluster at ADDRESS ('auto' = the one this "
                        "machine belongs to), or on a local Ray instance without ADDRESS "
                        "(pip install 'ctlanguage[cluster]')")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers (one engine each; default: one per available CPU)")
    p.add_argument("--retries", type=int, default=2, help="retries of a case whose Ray worker died")
    p.add_argument("--shard", metavar="I/N",
                   help="only every N-th case from the I-th (0-based), e.g. "
                        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; then `batch merge DIR`")
    _add_model_args(p)
    p.set_defaults(func=cmd_batch)
