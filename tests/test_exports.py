"""The public surface is what ``revdial.__all__`` says (trio keeps its exports honest so)."""

from __future__ import annotations

import inspect
import types

import revdial


def test_all_names_exist_and_come_from_revdial() -> None:
    assert len(set(revdial.__all__)) == len(revdial.__all__)
    for name in revdial.__all__:
        obj = getattr(revdial, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):  # not aliases, not constants
            assert obj.__module__.startswith("revdial"), (name, obj.__module__)


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name, obj in vars(revdial).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    }
    assert public - {"__version__"} == set(revdial.__all__)


def test_abort_is_public() -> None:
    assert revdial.abort.__module__ == "revdial._splice"
    assert revdial.ABORT_REASON != "EOF"
