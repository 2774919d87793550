"""Every benchmark's ``--quick`` path runs and writes JSON, and benchmarks use
only the public API and the numeric layer.

Each ``benchmarks/bench_*.py`` (found by glob, so a new benchmark is covered
without editing this file) runs as ``python BENCH --quick --output TMP`` in a
subprocess with one thread; its quick path exercises every section with
tiny sizes in seconds.  Its numbers are not checked: benchmarks measure,
they do not assert.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py"))
#: Private modules of the estimators: benchmarks reach the numerics through
#: ``sknlica._torch`` (the numeric layer) and the rest through ``sknlica``.
PRIVATE_MODULES = ("sknlica._base", "sknlica._mle", "sknlica._vae", "sknlica._marginal")
TIMEOUT_S = 240


def test_benchmarks_are_found():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_quick_run_writes_json(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=BENCHMARKS.parent,
        check=False,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    written = sorted(tmp_path.glob("*.json"))
    assert written, f"{script.name} --quick wrote no JSON into {tmp_path}"
    for path in written:
        assert path.stem.endswith("_quick"), path.name
        payload = json.loads(path.read_text())
        assert payload["quick"] is True
        assert path.with_suffix(".md").exists()


def _python_files():
    return sorted(BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("path", _python_files(), ids=lambda path: path.name)
def test_benchmark_uses_public_api_and_numeric_layer(path):
    """No estimator internals: no private modules of the estimators, no
    ``inspect`` on library signatures, no underscore attribute (such as
    ``estimator._build_model``) of anything."""
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            if name == "inspect" or name.startswith(PRIVATE_MODULES):
                problems.append(f"line {node.lineno}: import {name}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            problems.append(f"line {node.lineno}: .{node.attr}")
    assert not problems, problems
