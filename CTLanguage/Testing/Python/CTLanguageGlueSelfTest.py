"""MRML glue self-test for a Slicer build (registered by Testing/Python/CMakeLists.txt).

Uses numpy masks (no model, no torch): a volume node in a non-RAS orientation with anisotropic
spacing and an offset origin; findings -> segments -> labelmap export equals the masks exactly;
terminology strings parse; the table holds the numbers; .seg.nrrd round trip.
"""

import os
import tempfile
import unittest
from types import SimpleNamespace

import numpy as np
import slicer
from ctlanguage.engine import Finding

from CTLanguageLib import mrml_glue, results_table

IJK_TO_RAS = np.array([[0.0, 0.0, 2.5, -61.0], [-0.8, 0.0, 0.0, 37.5], [0.0, -1.1, 0.0, 212.25], [0, 0, 0, 1.0]])


class CTLanguageGlueSelfTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_findings_round_trip()

    def test_findings_round_trip(self):
        scene = slicer.mrmlScene
        rng = np.random.default_rng(1)
        ct = rng.normal(0, 20, (18, 40, 33)).astype(np.int16)
        volume = mrml_glue.ctvolume_to_volume_node(scene, SimpleNamespace(array=ct, ijk_to_ras=IJK_TO_RAS), "glue")
        findings = []
        for n, (prompt, prob) in enumerate((("liver lesion", 0.8), ("liver", None))):
            mask = np.zeros(ct.shape, np.uint8)
            mask[2 + n:9, 5:20 + n, 10:13] = 1
            findings.append(Finding(prompt=prompt, parsed=None, kind="finding" if prob else "anatomy",
                                    anatomy="liver", finding=None, laterality=None, probability=prob,
                                    prompt_confidence=0.9, mask=mask, volume_ml=1.5, codes=None,
                                    color=(230, 50, 25)))
        seg, ids = mrml_glue.findings_to_segmentation(scene, findings, volume)
        logic = slicer.vtkSlicerTerminologiesModuleLogic()
        for f, sid in zip(findings, ids):
            back = mrml_glue.segment_mask_on_reference(scene, seg, sid, volume)
            self.assertTrue(np.array_equal(back, f.mask))
            entry = slicer.vtkSlicerTerminologyEntry()
            self.assertTrue(logic.DeserializeTerminologyEntry(seg.GetSegmentation().GetSegment(sid).GetTerminology(), entry))
        table = results_table.findings_to_table(scene, findings, ids)
        rows = results_table.table_rows(table)
        self.assertAlmostEqual(rows[0]["probability"], 0.8)
        self.assertTrue(np.isnan(rows[1]["probability"]))
        with tempfile.TemporaryDirectory() as folder:
            path = mrml_glue.save_segmentation(seg, os.path.join(folder, "f.seg.nrrd"))
            loaded = mrml_glue.load_segmentation(scene, path)
            for f, sid in zip(findings, ids):
                self.assertTrue(np.array_equal(mrml_glue.segment_mask_on_reference(scene, loaded, sid, volume), f.mask))
