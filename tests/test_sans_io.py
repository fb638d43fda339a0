"""House rule 1: the protocol core does no I/O and reads no clock.

``_frames``, ``_state``, ``_errors``, ``_limits`` and ``_backoff`` may import the standard
library (minus anything that does I/O, reads time or randomness, or imports
by name at run time) and each other, with relative imports only. This is
checked on the source (AST), so an import hidden in a function or behind
``if TYPE_CHECKING`` counts too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import revdial

SANS_IO_MODULES = ("_backoff", "_errors", "_frames", "_limits", "_peerstate", "_state", "_stats")

#: Standard-library modules the core must not use even though they are stdlib.
FORBIDDEN = frozenset(
    {
        "trio",
        "trio_websocket",
        "wsproto",
        "h11",
        "socket",
        "ssl",
        "selectors",
        "select",
        "asyncio",
        "threading",
        "multiprocessing",
        "subprocess",
        "time",
        "datetime",
        "random",
        "secrets",
        "os",
        "io",
        "logging",
        "importlib",
    }
)

PACKAGE_DIR = Path(revdial.__file__).resolve().parent


def _tree(module: str) -> ast.Module:
    path = PACKAGE_DIR / f"{module}.py"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imports(module: str, tree: ast.Module | None = None) -> tuple[set[str], set[str]]:
    """(absolute top-level modules, relative sibling modules) ``module`` imports."""
    absolute: set[str] = set()
    relative: set[str] = set()
    for node in ast.walk(_tree(module) if tree is None else tree):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                absolute.add(node.module.split(".")[0])
            else:
                assert node.level == 1, f"{module}: imports from outside the package"
                if node.module is None:  # from . import x, y
                    relative.update(alias.name for alias in node.names)
                else:
                    relative.add(node.module.split(".")[0])
    return absolute, relative


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_imports_only_stdlib(module: str) -> None:
    absolute, _ = imports(module)
    absolute.discard("__future__")
    not_stdlib = {name for name in absolute if name not in sys.stdlib_module_names}
    assert not not_stdlib, f"{module} imports third-party modules: {sorted(not_stdlib)}"
    forbidden = absolute & FORBIDDEN
    assert not forbidden, f"{module} imports I/O, clock or randomness: {sorted(forbidden)}"


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_relative_imports_stay_in_the_core(module: str) -> None:
    _, relative = imports(module)
    outside = relative - set(SANS_IO_MODULES)
    assert not outside, f"{module} imports driver modules: {sorted(outside)}"


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_no_dynamic_imports(module: str) -> None:
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("__import__", "eval", "exec"), (
                f"{module}:{node.lineno} calls {node.func.id}()"
            )


def test_checker_sees_imports() -> None:
    """The checks above would notice a violation (they are not vacuous)."""
    _, state_relative = imports("_state")
    assert {"_errors", "_frames", "_limits"} <= state_relative
    frames_absolute, _ = imports("_frames")
    assert "struct" in frames_absolute
    bad = ast.parse(
        "import os.path\n"
        "from time import monotonic\n"
        "from . import _session, _errors\n"
        "from ._stream import TunnelStream\n"
        "def f():\n"
        "    import trio\n"
    )
    absolute, relative = imports("bad", bad)
    assert absolute == {"os", "time", "trio"}
    assert absolute <= FORBIDDEN
    assert relative == {"_session", "_errors", "_stream"}
    with pytest.raises(AssertionError, match="outside the package"):
        imports("bad", ast.parse("from ..other import x\n"))
