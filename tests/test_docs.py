"""The documentation builds with warnings as errors (gallery not executed).

`make docs` builds it with the gallery executed; the examples also have their
own test.  This keeps docstrings, the user guide and the API reference valid
reStructuredText that resolves.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None
    or importlib.util.find_spec("numpydoc") is None
    or importlib.util.find_spec("sphinx_gallery") is None,
    reason="the docs toolchain comes with the 'test' and 'docs' extras",
)
def test_docs_build_without_warnings(tmp_path):
    source = tmp_path / "docs"
    # Build from a copy: autosummary and the gallery write into the source tree.
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build", "generated"))
    shutil.copytree(DOCS.parent / "examples", tmp_path / "examples")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(source),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "SKNLICA_DOCS_EXECUTE": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "api.html").exists()
    assert (tmp_path / "html" / "user_guide" / "mle.html").exists()
