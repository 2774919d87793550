"""Every examples/plot_*.py runs to completion (quick sizes, Agg backend)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("plot_*.py"))

#: Seconds per example: quick runs take 5-20 s alone on 2 busy cores; the
#: margin covers a loaded machine, and a hung example still fails.
TIMEOUT = 300


def test_examples_are_found():
    assert len(EXAMPLES) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, tmp_path):
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "SKNLICA_EXAMPLE_QUICK": "1",
        # One thread each: xdist may run several examples at once.
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
