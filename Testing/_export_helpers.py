"""Small synthetic CT + finding-like objects for the export/CLI tests (no engine needed)."""

from __future__ import annotations

import numpy as np

from ctlanguage.exports import ExportFinding
from ctlanguage.volume import CTVolume


def synthetic_volume(shape=(24, 40, 48), ijk_to_ras=None, source=None) -> CTVolume:
    k, j, i = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    cj, ci = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    body = ((j - cj) / (0.42 * shape[1])) ** 2 + ((i - ci) / (0.45 * shape[2])) ** 2 < 1
    arr = np.where(body, 40.0, -1000.0).astype(np.float32)
    arr[body & (i < ci) & (j < cj)] = -850.0  # a "lung"
    if ijk_to_ras is None:
        ijk_to_ras = np.array([[-0.9, 0, 0, 40.0], [0, -0.9, 0, 30.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    return CTVolume(arr, ijk_to_ras, source=source, modality="CT")


def synthetic_findings(shape=(24, 40, 48)) -> list[ExportFinding]:
    liver = np.zeros(shape, np.uint8)
    liver[6:18, 14:30, 26:42] = 1
    lesion = np.zeros(shape, np.uint8)
    lesion[10:13, 18:23, 30:35] = 1
    lung = np.zeros(shape, np.uint8)
    lung[4:20, 8:18, 6:22] = 1
    empty = np.zeros(shape, np.uint8)
    return [
        ExportFinding("liver", liver, anatomy="liver", prompt_confidence=0.95, volume_ml=12.0),
        ExportFinding("liver lesion", lesion, anatomy="liver", finding="liver_lesion",
                      probability=0.81, prompt_confidence=0.9, volume_ml=0.2),
        ExportFinding("left lung", lung, anatomy="lung_left", laterality="left", prompt_confidence=0.9),
        ExportFinding("fluid around the right lung", empty, anatomy="pleural_space_right",
                      finding="pleural_effusion", laterality="right", probability=0.07,
                      prompt_confidence=0.7, volume_ml=0.0),
    ]


MODEL_INFO = {"id": "test-model", "version": "0.0.1", "sha256": "0" * 64}
