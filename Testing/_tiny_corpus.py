"""A tiny synthetic manifest (blobs on a box 'body') for fast training tests; no phantom needed."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {1: "liver", 2: "lung_upper_lobe_left", 3: "lung_lower_lobe_left", 4: "lung_upper_lobe_right",
          5: "lung_lower_lobe_right", 6: "kidney_left", 7: "kidney_right", 8: "heart"}


def _write(arr, path, spacing=5.0):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing,) * 3)
    # LPS direction identity: i -> L ; fine, the preprocessing reorients to RAS
    sitk.WriteImage(img, str(path))


def make_tiny_corpus(root: Path, n: int = 4, seed: int = 0, shape=(40, 32, 40)) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for c in range(n):
        rng = np.random.default_rng(seed + c)
        D, H, W = shape
        z, y, x = np.mgrid[:D, :H, :W]
        hu = np.full(shape, -1000.0, np.float32)
        lab = np.zeros(shape, np.uint8)
        body = (abs(y - H / 2) < H / 2 - 3) & (abs(x - W / 2) < W / 2 - 3) & (z > 2) & (z < D - 3)
        hu[body] = 40
        def blob(cz, cy, cx, r):
            return (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < r * r
        # sitk index x grows toward patient left (LPS), so "left" organs are at large x
        parts = {2: blob(28, 16, 28, 6), 3: blob(20, 16, 28, 6), 4: blob(28, 16, 12, 6),
                 5: blob(20, 16, 12, 6), 1: blob(10, 16, 14, 6), 6: blob(10, 20, 29, 3),
                 7: blob(10, 20, 11, 3), 8: blob(24, 12, 20, 4)}
        for k, m in parts.items():
            lab[m & body] = k
            hu[m & body] = -850 if k in (2, 3, 4, 5) else 60
        cd = root / f"case_{c:03d}"
        (cd / "findings").mkdir(parents=True, exist_ok=True)
        findings, labels = [], {"liver_lesion": 0, "lung_nodule": 0}
        if c % 2 == 0:
            les = blob(10, 16, 14, 3)
            hu[les] = 5
            _write(les.astype(np.uint8), cd / "findings" / "liver_lesion.nii.gz")
            findings.append({"name": "liver_lesion", "anatomy": "liver", "laterality": None,
                             "mask": f"case_{c:03d}/findings/liver_lesion.nii.gz", "volume_ml": 1.0})
            labels["liver_lesion"] = 1
        hu += rng.normal(0, 10, shape).astype(np.float32)
        _write(hu, cd / "ct.nii.gz")
        _write(lab, cd / "structures.nii.gz")
        rep = "Liver lesion." if c % 2 == 0 else "No acute findings."
        (cd / "report.txt").write_text(rep)
        lines.append(json.dumps({"case_id": f"case_{c:03d}", "seed": seed + c, "image": f"case_{c:03d}/ct.nii.gz",
                                 "report": f"case_{c:03d}/report.txt", "structures": f"case_{c:03d}/structures.nii.gz",
                                 "structure_labels": {str(k): v for k, v in LABELS.items()},
                                 "findings": findings, "labels": labels}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"
