"""What may appear of a URL or request-target in a log line.

Query strings carry tokens often enough (``?token=``, ``?access_token=``,
signed URLs) that no log line, at any level, shows one verbatim; neither does
the user-info part of a URL (``user:password@``). The path stays: it is what
an operator needs to tell requests apart.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["loggable_target", "loggable_url"]

#: Stands for a removed query string.
QUERY_MARK = "?…"


def loggable_target(target: bytes | str, limit: int = 200) -> str:
    """A request-target for a log line: its path, ``?…`` for any query."""
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    path, sep, _ = text.partition("?")
    return path[:limit] + (QUERY_MARK if sep else "")


def loggable_url(url: str) -> str:
    """A URL for a log line: no user-info, ``?…`` for any query, no fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return loggable_target(url.partition("#")[0])
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    query = QUERY_MARK if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"
