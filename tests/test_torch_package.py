"""``sknlica._torch`` never imports scikit-learn (its package docstring's promise).

Each check runs in a fresh interpreter in which importing ``sklearn`` (or any
``sklearn.*`` module) raises ``ImportError``, and in which the ``sknlica``
package is registered without running its ``__init__`` (which imports the
estimators, and so scikit-learn).  Modules are discovered with ``pkgutil``, so
a new module in ``_torch/`` is covered automatically.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Blocks scikit-learn, registers ``sknlica`` as a bare namespace, then runs
#: ``BODY``; prints a JSON report on its last line.
PRELUDE = textwrap.dedent(
    """
    import importlib, importlib.abc, importlib.util, json, pkgutil, sys, types

    class BlockSklearn(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sklearn" or name.startswith("sklearn."):
                raise ImportError(f"scikit-learn is blocked: import of {name!r}")
            return None

    sys.meta_path.insert(0, BlockSklearn())
    spec = importlib.util.find_spec("sknlica")  # locates it without importing
    package = types.ModuleType("sknlica")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["sknlica"] = package
    """
)

IMPORT_EVERY_MODULE = PRELUDE + textwrap.dedent(
    """
    import sknlica._torch as torch_package
    names, failures = [], {}
    for info in pkgutil.walk_packages(torch_package.__path__, "sknlica._torch."):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as error:
            failures[info.name] = f"{type(error).__name__}: {error}"
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "sklearn")
    print(json.dumps({"modules": names, "failures": failures, "sklearn": loaded}))
    """
)


def _run(script: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    return _run(IMPORT_EVERY_MODULE)


def test_every_torch_module_imports_without_scikit_learn(report):
    assert report["failures"] == {}
    assert report["sklearn"] == []


def test_every_module_file_was_discovered(report):
    # pkgutil found each module file of the package (and nothing else).
    files = sorted(
        f"sknlica._torch.{path.stem}"
        for path in (ROOT / "sknlica" / "_torch").glob("*.py")
        if path.stem != "__init__"
    )
    assert sorted(report["modules"]) == files
    assert {"sknlica._torch.training", "sknlica._torch.gaussian"} <= set(files)


def test_the_block_catches_a_module_that_imports_scikit_learn():
    # Negative control: under the same block, the estimators' base module
    # (which imports scikit-learn) fails to import.
    script = PRELUDE + textwrap.dedent(
        """
        try:
            import sknlica._base
        except ImportError as error:
            print(json.dumps({"blocked": str(error)}))
        else:
            print(json.dumps({"blocked": None}))
        """
    )
    assert "scikit-learn is blocked" in (_run(script)["blocked"] or "")
