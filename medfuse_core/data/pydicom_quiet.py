"""Keep pydicom quiet while reading: its warnings and log records echo header values and paths.

Shared by decoding and de-identification; standard library only.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

_quiet_state = threading.local()


class _QuietFilter(logging.Filter):
    """Drops pydicom log records emitted while :func:`quiet_pydicom` is active on this thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(_quiet_state, "depth", 0) == 0


_PYDICOM_LOGGER = logging.getLogger("pydicom")
if not any(isinstance(f, _QuietFilter) for f in _PYDICOM_LOGGER.filters):
    _PYDICOM_LOGGER.addFilter(_QuietFilter())


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom warnings (process-wide) and log records (this thread)."""
    _quiet_state.depth = getattr(_quiet_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet_state.depth -= 1
