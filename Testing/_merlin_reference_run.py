"""Run merlin-vlm 0.0.7 (the reference) offline and write what the parity tests compare against.

Runs in a subprocess whose path includes the reference stack (merlin-vlm, torchvision, ...;
see scripts/setup_env.sh): torchvision's CUDA-built PyPI wheel must never be importable in the
test process itself, where MONAI would pick it up. Usage::

    python _merlin_reference_run.py OUTDIR [NIFTI ...]

Writes to OUTDIR: ``clinical-longformer/`` (tiny random Longformer + tokenizer), ``upstream.pt``
(the reference model's seeded random state dict, pickled as merlin publishes it),
``reference.npz`` (inputs and outputs) and ``texts.json``; for each NIfTI given, the output of
merlin's own MONAI ``ImageTransforms`` as ``<name>.merlin.npy``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TEXTS = ["No pleural effusion.", "Large LEFT pleural effusion, with atelectasis (RLL)!",
         "hepatic steatosis", "Liver: 2.3 x 1.1 cm lesion -- ?cyst", "ÉPANCHEMENT pleural",
         "a\tb\nc"]


def main(out: Path, niftis: list) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _merlin_helpers as H

    torch.set_num_threads(1)
    H.import_torchvision()
    from merlin.data.monai_transforms import ImageTransforms
    from merlin.models import build

    for nii in niftis:
        arr = np.asarray(ImageTransforms({"image": nii})["image"])[0]
        np.save(out / (Path(nii).name.split(".")[0] + ".merlin.npy"), arr.astype(np.float32))

    lf = H.tiny_longformer_folder(out / "clinical-longformer")
    torch.manual_seed(0)
    with H.offline_upstream(build, lf):
        ref = build.MerlinArchitecture()
    ref.eval()
    sd = H.randomise_(ref, seed=1)
    ref.load_state_dict(sd, strict=True)
    torch.save(sd, out / "upstream.pt")

    x = torch.rand((1, 1, 64, 64, 32), generator=torch.Generator().manual_seed(3))  # (B,1,X,Y,Z)
    with torch.no_grad():
        emb, ehr = ref.encode_image(x)
        img_n, _, txt_n = ref(x, TEXTS)          # upstream normalises both sides
        txt_raw = ref.encode_text(TEXTS)
    np.savez(out / "reference.npz", x=x.numpy(), embedding=emb.numpy(), phenotype_logits=ehr.numpy(),
             image_normalised=img_n.numpy(), text_raw=txt_raw.numpy(), text_normalised=txt_n.numpy())
    (out / "texts.json").write_text(json.dumps({
        "texts": TEXTS, "sanitized": [build.sanitize_report(t) for t in TEXTS],
        "keys": len(sd)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
