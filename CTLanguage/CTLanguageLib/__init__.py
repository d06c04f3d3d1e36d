"""Slicer-side helpers of the CTLanguage module: MRML glue, background encoding, dependency
handling and model-catalog UI helpers.

Nothing heavy is imported here: the engine (``ctlanguage``, torch) is imported lazily by the
functions that need it, so importing this package costs nothing at Slicer start-up.
"""
