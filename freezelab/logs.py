"""freezelab's own console lines: the ``freezelab`` logger, one configuration.

Every module logs to ``logging.getLogger(__name__)``; this handler shows those lines
on the current standard output as ``[freezelab] ...`` (a warning as ``[freezelab]
warning: ...``), in the driver and in Ray's workers alike (their output reaches the
driver's console). ``-v`` (``FREEZELAB_LOG_LEVEL=INFO`` or ``DEBUG``) adds freezelab's
debug lines; other libraries' logging is the CLI's ``logging.basicConfig``.

>>> import io, contextlib
>>> out = io.StringIO()
>>> with contextlib.redirect_stdout(out):
...     logging.getLogger("freezelab.example").warning("disk %d%% full", 93)
>>> out.getvalue()
'[freezelab] warning: disk 93% full\\n'
"""

from __future__ import annotations

import logging
import sys

from freezelab.env import verbose

PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"[freezelab] {PREFIXES.get(record.levelno, '')}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a test's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # set by StreamHandler.__init__; always stdout
        pass


def configure() -> None:
    """Install the handler once, at the level that ``FREEZELAB_LOG_LEVEL`` asks for."""
    logger = logging.getLogger("freezelab")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose() else logging.INFO)
