"""Progress and cancel callbacks as every backend and the engine use them."""

from __future__ import annotations

import logging
from typing import Optional

from ..errors import CancelledError
from .protocol import CancelFn, ProgressFn

log = logging.getLogger(__name__)


def report(progress: Optional[ProgressFn], fraction: float, message: str) -> None:
    """Call ``progress(fraction, message)``; a broken callback never breaks inference, but a
    CancelledError raised from it cancels."""
    if progress is not None:
        try:
            progress(float(min(max(fraction, 0.0), 1.0)), message)
        except CancelledError:
            raise
        except Exception:
            log.debug("progress callback failed", exc_info=True)


def check_cancel(cancel: Optional[CancelFn]) -> None:
    if cancel is not None and cancel():
        raise CancelledError("Encoding was cancelled.")


def scaled(progress: Optional[ProgressFn], lo: float, hi: float) -> Optional[ProgressFn]:
    """``progress`` mapped onto [lo, hi] (one backend's share of a pipeline's encode)."""
    if progress is None:
        return None
    return lambda f, m="": progress(lo + (hi - lo) * float(f), m)
