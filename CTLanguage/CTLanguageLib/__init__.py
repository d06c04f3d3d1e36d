"""Slicer-side helpers of the CTLanguage module: the logic front the widget talks to
(``logic.Logic``), per-scene session state, MRML glue, results table, exports, background
encoding (worker process and its line protocol), dependency handling and the model menu.

Nothing heavy is imported here: the engine (``ctlanguage``, torch) is imported lazily by the
functions that need it, so importing this package costs nothing at Slicer start-up.
"""
