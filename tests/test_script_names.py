"""No script the project puts on ``sys.path`` shadows a module that Python or an installed
package imports.

Running ``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``, and the tests
put ``tests/`` and ``examples/`` there. A file there named like a top-level module that a
dependency imports is found first: ``benchmarks/kernels.py`` broke every Hugging Face import
once ``transformers`` began to import the ``kernels`` distribution, and
``examples/distributed.py`` stood where ``fsspec`` and ``joblib`` look for Dask's
``distributed``. The check runs in both test environments (``make test``), since each holds
other packages.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ON_PATH = ("benchmarks", "examples", "tests")
"""Folders whose files become top-level modules: a script's own folder, and what the
test suite inserts into ``sys.path``."""

_IMPORT = re.compile(rb"^[ \t]*(?:import|from)[ \t]+([A-Za-z_]\w*)", re.MULTILINE)


def _imported_by_installed_code() -> set[str]:
    """Top-level names that installed packages import, unconditionally or optionally (an
    ``import distributed`` inside ``try``): every ``import``/``from`` line of site-packages."""
    names: set[str] = set()
    roots = {Path(sysconfig.get_paths()[scheme]) for scheme in ("purelib", "platlib")}
    for root in roots:
        for path in root.rglob("*.py"):
            try:
                names.update(m.decode() for m in _IMPORT.findall(path.read_bytes()))
            except OSError:  # a broken link in an installed package
                continue
    return names


def taken_names() -> set[str]:
    """Top-level module names a project file must not take: the standard library's, those
    installed distributions provide, and those installed code imports."""
    provided = set(importlib.metadata.packages_distributions())
    return set(sys.stdlib_module_names) | provided | _imported_by_installed_code()


def project_modules() -> dict[str, Path]:
    """The top-level module name each file in an :data:`ON_PATH` folder takes."""
    return {p.stem: p for folder in ON_PATH for p in sorted((ROOT / folder).glob("*.py"))}


@pytest.mark.all_environments
def test_no_project_script_shadows_an_importable_module():
    taken = taken_names()
    assert {"torch", "os"} <= taken  # the scan sees installed and standard modules
    clashes = {name: str(p.relative_to(ROOT)) for name, p in project_modules().items()}
    clashes = {name: path for name, path in clashes.items() if name in taken}
    assert not clashes, f"rename these: they shadow modules that may be imported: {clashes}"
