"""CTLanguage browser demo on trame-slicer (``ctlanguage web``).

``launcher`` serves http://127.0.0.1:8080/ and starts one session process (``app``) per browser
tab, so two tabs never share a scene, an encoding or an upload; ``session`` holds one session's
data and reuses the Slicer module's logic (``CTLanguageLib``) and the engine's exports.
"""

DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"
