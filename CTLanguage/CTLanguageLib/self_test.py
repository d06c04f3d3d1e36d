"""The module's end-to-end flow inside a real Slicer (run by ``CTLanguageTest`` in CTLanguage.py):
a synthetic phantom CT volume node -> encode in the worker process with the embedded default model
-> prompts -> segments equal the engine's masks exactly -> findings table -> .seg.nrrd round trip.
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import numpy as np

from . import mrml_glue, results_table


def prompt_flow(test, logic) -> None:
    """``test``: a ScriptedLoadableModuleTest (assertions, delayDisplay); ``logic``: CTLanguageLogic."""
    import slicer
    from ctlanguage.phantom import generate_case

    case = generate_case(3)  # PhantomCase: .volume (HU, [k,j,i]) + .ijk_to_ras
    volume = mrml_glue.ctvolume_to_volume_node(
        slicer.mrmlScene, SimpleNamespace(array=case.volume, ijk_to_ras=case.ijk_to_ras), "CTLanguagePhantom")
    logic.setupPythonRequirements(ask=False)
    logic.setModel("default", "auto")
    test.delayDisplay("Encoding (separate process)")
    test.assertEqual(logic.encode(volume, waitForCompletion=True).state, "finished")
    test.assertTrue(logic.isEncoded(volume))
    results = logic.runPrompts(volume, "liver; fluid around the left lung")
    test.assertEqual(len(results), 2)
    seg = logic.segmentationNode(volume)
    test.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 2)
    for r in results:
        back = mrml_glue.segment_mask_on_reference(slicer.mrmlScene, seg, r.segment_id, volume)
        test.assertTrue(np.array_equal(back, r.finding.mask), r.prompt)
    test.assertGreater(int(results[0].finding.mask.sum()), 0)
    rows = results_table.table_rows(logic.tableNode(volume))
    test.assertEqual([row["prompt"] for row in rows], [r.prompt for r in results])
    with tempfile.TemporaryDirectory() as folder:
        loaded = mrml_glue.load_segmentation(slicer.mrmlScene, logic.export(volume, folder, "segnrrd"))
        test.assertEqual(loaded.GetSegmentation().GetNumberOfSegments(), 2)
    test.delayDisplay("CTLanguage test passed")
