"""Exception hierarchy. Every error a user can cause derives from CTLanguageError and carries
one specific, human-readable sentence; the CLI and the Slicer module show it without a traceback."""


class CTLanguageError(Exception):
    """Base class for all user-facing errors."""


class InputError(CTLanguageError):
    """Unreadable, corrupt, truncated or unsuitable input (wrong modality, bad shape, NaNs)."""


class GeometryError(InputError):
    """Geometry that cannot be handled safely (gantry tilt, irregular slice spacing, missing slices)."""


class CheckpointError(CTLanguageError):
    """Corrupt, tampered, mismatched or unsafe (pickled) model checkpoint."""


class PromptError(CTLanguageError):
    """A prompt that cannot be used at all (empty, only punctuation)."""


class ExportError(CTLanguageError):
    """An output could not be written; nothing partial is left behind."""


class CancelledError(CTLanguageError):
    """The user cancelled a long-running operation."""
