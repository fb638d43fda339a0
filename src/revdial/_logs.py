"""Log output of the ``revdial`` command: text for people, JSON lines for machines.

``revdial --log-format json`` makes every log line one JSON object::

    {"time": "2026-12-02T11:16:39.123Z", "level": "info", "logger": "revdial",
     "message": "session 3: client 'edge' connected from 10.0.0.5:51234 (...)",
     "event": "session_start", "session_id": 3, "client_key": "edge", ...}

``time``, ``level``, ``logger`` and ``message`` are always there; the
structured fields a call passes with ``extra=`` (session start/end carry
``event``, ``session_id``, ``client_key``, ``remote``, and at the end
``duration_s``, ``bytes_in``, ``bytes_out``, ``reason``) follow; a traceback
goes into ``exception``. Tokens are never passed to the logger, and request
targets and URLs are logged without their query string.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has: anything else came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None))
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, int | float | str | bool) or (
                    value is None
                ) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Send the root logger's records to stderr at ``level``, as ``text`` or ``json``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
