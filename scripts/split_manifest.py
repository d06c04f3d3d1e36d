#!/usr/bin/env python
"""Split a phantom manifest.jsonl by what its cases' variation drew (field of view, contrast phase or
slice thickness):

    python scripts/split_manifest.py DIR/manifest.jsonl fov      # -> DIR/manifest_fov-chest.jsonl ...
    python scripts/split_manifest.py DIR/manifest.jsonl phase    # -> DIR/manifest_phase-arterial.jsonl ...
    python scripts/split_manifest.py DIR/manifest.jsonl slice_mm # -> DIR/manifest_slice_mm-5.0.jsonl ...

The parts sit next to the manifest, so its relative paths stay valid; each can be passed to
`ctlanguage evaluate --data`. Cases written without --variation have no such record: exit 2."""

import json
import sys
from pathlib import Path

KEYS = ("fov", "phase", "slice_mm")


def main(argv) -> int:
    if len(argv) != 2 or argv[1] not in KEYS:
        print(f"usage: split_manifest.py MANIFEST {'|'.join(KEYS)}", file=sys.stderr)
        return 2
    path, key = Path(argv[0]), argv[1]
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    groups: dict = {}
    for r in recs:
        v = ((r.get("phantom") or {}).get("variation") or {}).get(key)
        if v is None:
            print(f"error: {r.get('case_id')} has no drawn {key} (write the corpus with --variation)", file=sys.stderr)
            return 2
        groups.setdefault(v, []).append(r)
    for v, rs in sorted(groups.items()):
        out = path.with_name(f"{path.stem}_{key}-{v}.jsonl")
        out.write_text("".join(json.dumps(r) + "\n" for r in rs), encoding="utf-8")
        print(f"{out}: {len(rs)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
