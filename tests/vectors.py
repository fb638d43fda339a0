"""Loader for the Go-recorded remotedialer vectors in ``tests/vectors/``.

The vectors are part of the repository (``tests/vectors/README.md`` says where
they come from), found relative to this file: nothing here reads a path
outside the checkout, so a fresh clone in any folder runs the same tests.

Missing vectors are a test *failure*, never a skip: a green run without them
would prove nothing about wire compatibility. Parametrized tests therefore get
a single ``vectors-missing`` case that fails with the reason (see
:func:`params` and :func:`require`), so the rest of the suite still runs.

Integers in the JSON are exact signed 64-bit values; :mod:`json` parses them
as ``int``, never as ``float``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
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
    "vectors_dir",
]

FRAMES_FILE = "remotedialer-frames.json"
SESSION_FILE = "remotedialer-session.json"

#: One JSON object from the vector files.
Vector = dict[str, Any]


class VectorsMissingError(RuntimeError):
    """The recorded vectors could not be found or read."""


def vectors_dir() -> Path:
    """``tests/vectors/``, beside this file."""
    return Path(__file__).resolve().parent / "vectors"


@functools.cache
def _load(name: str) -> Vector:
    path = vectors_dir() / name
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise VectorsMissingError(
            f"cannot read vector file {path}: {exc} (the wire-compatibility tests need the "
            "recorded vectors; see tests/vectors/README.md)"
        ) from exc
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
        return [pytest.param(Missing(str(exc)), id="vectors-missing")]
    return [
        pytest.param(v, id=str(v.get("name", v.get("scenario", i)))) for i, v in enumerate(items)
    ]


def require(item: Vector | Missing) -> Vector:
    """Return the vector, or fail the test (never skip) when vectors are missing."""
    if isinstance(item, Missing):
        pytest.fail(item.reason, pytrace=False)
    return item
