"""The repository is self-contained: a clone in any folder builds, tests and fuzzes.

Nothing may read a path outside the checkout (such as a ``shared/`` folder that
happens to sit beside the developers' clone): a user's clone has none, and a
test suite that depends on it fails for every newcomer while passing on the
developers' machines.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: What the build, tests, fuzzers, benchmarks and demo are made of.
CHECKED = ("src", "tests", "fuzz", "benchmarks", "Makefile", ".ci", "pyproject.toml")
_SKIP_DIRS = {".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
              ".hypothesis", "results", "vectors"}
_SUFFIXES = {".py", ".toml", ".cfg", ".ini", ".sh", ".txt", ".json", ".yaml", ".yml", ""}

#: The folder beside the developers' checkout that a user's clone lacks. (Its
#: name is assembled here so that this file does not itself look like a
#: reference to it, to this guard or to others.)
_SIBLING = "sha" + "red"
#: References that climb out of the checkout, in any spelling we have used: the
#: sibling folder after two dots and a slash, the old environment override, the
#: folder's name as a quoted path component, and two levels up.
_OUTSIDE = re.compile(
    r"\.\./+" + _SIBLING
    + "|REVDIAL_" + _SIBLING.upper()
    + r"|[\"']" + _SIBLING + r"[/\"']"
    + r"|\.\.[/\\]\.\."
)

#: SHA-256 of the recorded vectors (tests/vectors/README.md says where they come from).
VECTOR_SHA256 = {
    "remotedialer-frames.json":
        "34809b977d0cbfe9457359011e814f0d43f73227c8dee2f5a5a42d39e5ab01fb",
    "remotedialer-session.json":
        "5b6b90e592f78803b0565666ce8ad7b5a28f7360f1615c38ddc7491100b4ba9e",
}


def _files() -> list[Path]:
    out: list[Path] = []
    for name in CHECKED:
        top = REPO / name
        if top.is_file():
            out.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            out += [Path(dirpath, f) for f in filenames if Path(f).suffix in _SUFFIXES]
    return out


def test_nothing_reads_outside_the_checkout() -> None:
    files = _files()
    assert len(files) > 20, files  # the walk really covered the tree
    hits = []
    for path in files:
        if path == Path(__file__).resolve():
            continue  # this file names the patterns it looks for
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not hits, "references outside the checkout:\n" + "\n".join(hits)


def test_the_guard_sees_what_it_looks_for() -> None:
    up = ".." + "/"
    for bad in (f'Path(__file__).resolve().parents[2] / "{_SIBLING}"',
                f"see {up}{_SIBLING}/PROTOCOL.md",
                f'os.environ["REVDIAL_{_SIBLING.upper()}_DIR"]',
                f"REPO.parent / '{_SIBLING}/vectors'", "cd ../.."):
        assert _OUTSIDE.search(bad), bad
    for good in ("Path(__file__).resolve().parents[1]", "REPO / 'tests' / 'vectors'",
                 "shared by every stream", "../docs",
                 "Path(__file__).resolve().parent.parent"):
        assert not _OUTSIDE.search(good), good


@pytest.mark.parametrize("name", sorted(VECTOR_SHA256))
def test_recorded_vectors_are_in_the_repository_unchanged(name: str) -> None:
    path = REPO / "tests" / "vectors" / name
    assert path.is_file(), f"{path} is missing (see tests/vectors/README.md)"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VECTOR_SHA256[name]


def test_vector_tests_pass_from_a_copy_with_nothing_beside_it(tmp_path: Path) -> None:
    """The codec's vector tests, run from a copy of tests/ in an empty folder."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "tests", clone / "tests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", clone / "pyproject.toml")
    assert not (tmp_path / "shared").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVDIAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/test_frames.py"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))  # type: ignore[union-attr]
    assert passed >= 125, summary  # 80 encode + 45 decode vectors at least
    assert "vectors-missing" not in proc.stdout
