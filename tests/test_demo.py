"""``python -m sknlica.demo`` runs end to end (tiny sizes) and says what it did."""

import pytest

pytest.importorskip("matplotlib")

from sknlica import demo  # noqa: E402


def test_demo_runs_and_writes_its_figure(tmp_path, capsys):
    demo.main(["--small", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "gap to the true model" in out
    assert "factor analysis" in out and "noise='diagonal'" in out
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "python -m sknlica.experiments" in out
