#!/usr/bin/env python
"""Write CTLanguage/ctlanguage/data/totalseg_total.json from the installed TotalSegmentator:
the label number, name and DICOM codes (SNOMED CT) and colour of every class of its ``total``
task, copied from ``totalsegmentator/map_to_binary.py`` (``class_map["total"]``) and
``resources/totalsegmentator_snomed_mapping.csv``. Facts only; our phrasings for these classes
live in data/anatomy_totalseg.json.

    python scripts/make_totalseg_classes.py          # needs: pip install 'ctlanguage[totalseg]'
    python scripts/make_totalseg_classes.py --check  # exit 1 if the committed file differs
"""

import argparse
import csv
import json
import sys
from importlib import metadata, resources
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "CTLanguage" / "ctlanguage" / "data" / "totalseg_total.json"
FIELDS = {   # our name -> the CSV's DICOM attribute
    "category": "SegmentedPropertyCategoryCodeSequence",
    "type": "SegmentedPropertyTypeCodeSequence",
    "type_modifier": "SegmentedPropertyTypeModifierCodeSequence",
    "region": "AnatomicRegionSequence",
    "region_modifier": "AnatomicRegionModifierSequence",
}


def build() -> dict:
    from totalsegmentator.map_to_binary import class_map

    version = metadata.version("totalsegmentator")
    csv_path = resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
    with csv_path.open(encoding="utf-8") as f:
        rows = {r["Structure"]: r for r in csv.DictReader(f)}
    classes = []
    for label, name in sorted(class_map["total"].items()):
        row = rows[name]
        entry = {"label": int(label), "name": name}
        for ours, attr in FIELDS.items():
            value = row[f"{attr}.CodeValue"].strip()
            entry[ours] = ({"value": value, "scheme": row[f"{attr}.CodingSchemeDesignator"].strip(),
                            "meaning": row[f"{attr}.CodeMeaning"].strip()} if value else None)
        entry["color"] = [int(c) for c in row["DicomRGBColor"].split(",")]
        classes.append(entry)
    return {
        "source": (f"totalsegmentator {version}: map_to_binary.py class_map['total'] and "
                   "resources/totalsegmentator_snomed_mapping.csv"),
        "generated_by": "scripts/make_totalseg_classes.py",
        "task": "total",
        "classes": classes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file only")
    args = ap.parse_args()
    text = json.dumps(build(), indent=1) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT} differs from the installed TotalSegmentator")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(json.loads(text)['classes'])} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
