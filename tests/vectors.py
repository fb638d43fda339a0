"""Loader for the Go-recorded remotedialer vectors in ``shared/vectors/``.

The vectors live outside the repository, in a ``shared/`` folder *beside* the
checkout (``<parent>/<repo>`` and ``<parent>/shared``); CI clones the repository
under another name with a copy of ``shared/`` next to it, so the folder is
found relative to this file, never by a fixed path. ``REVDIAL_SHARED_DIR``
overrides it.

Missing vectors are a test *failure*, never a skip: a green run without them
would prove nothing about wire compatibility. Parametrized tests therefore get
a single ``shared-vectors-missing`` case that fails with the reason (see
:func:`params` and :func:`require`), so the rest of the suite still runs.

Integers in the JSON are exact signed 64-bit values; :mod:`json` parses them
as ``int``, never as ``float``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ENV_VAR",
    "FRAMES_FILE",
    "SESSION_FILE",
    "Missing",
    "Vector",
    "VectorsMissingError",
    "decode_vectors",
    "encode_vectors",
    "frames",
    "params",
    "require",
    "session",
    "shared_dir",
]

ENV_VAR = "REVDIAL_SHARED_DIR"
FRAMES_FILE = "remotedialer-frames.json"
SESSION_FILE = "remotedialer-session.json"

#: One JSON object from the vector files.
Vector = dict[str, Any]


class VectorsMissingError(RuntimeError):
    """The shared vectors could not be found or read."""


def shared_dir() -> Path:
    """The ``shared/`` folder: ``$REVDIAL_SHARED_DIR`` or ``<repo>/../shared``."""
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "shared"
    if not (path / "vectors").is_dir():
        how = f"${ENV_VAR}={override!r}" if override else f"default {path} (set ${ENV_VAR})"
        raise VectorsMissingError(
            f"remotedialer vectors not found: {path / 'vectors'} does not exist ({how}). "
            "Wire-compatibility tests need shared/vectors/*.json beside the repository."
        )
    return path


@functools.cache
def _load(name: str) -> Vector:
    path = shared_dir() / "vectors" / name
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise VectorsMissingError(f"cannot read vector file {path}: {exc}") from exc
    if not isinstance(data, dict) or "format" not in data:
        raise VectorsMissingError(f"{path} is not a remotedialer vector file (no 'format' key)")
    return data


def frames() -> Vector:
    """``remotedialer-frames.json`` (encode and decode vectors)."""
    return _load(FRAMES_FILE)


def session() -> Vector:
    """``remotedialer-session.json`` (wire transcripts)."""
    return _load(SESSION_FILE)


def encode_vectors() -> list[Vector]:
    vectors: list[Vector] = frames()["encode_vectors"]
    return vectors


def decode_vectors() -> list[Vector]:
    vectors: list[Vector] = frames()["decode_vectors"]
    return vectors


@dataclass(frozen=True)
class Missing:
    """Stands in for the vectors when they are absent; :func:`require` fails on it."""

    reason: str


def params(source: Callable[[], list[Vector]]) -> list[Any]:
    """``pytest.param`` per vector (id = its name), or one failing placeholder."""
    try:
        items = source()
    except VectorsMissingError as exc:
        return [pytest.param(Missing(str(exc)), id="shared-vectors-missing")]
    return [
        pytest.param(v, id=str(v.get("name", v.get("scenario", i)))) for i, v in enumerate(items)
    ]


def require(item: Vector | Missing) -> Vector:
    """Return the vector, or fail the test (never skip) when vectors are missing."""
    if isinstance(item, Missing):
        pytest.fail(item.reason, pytrace=False)
    return item
