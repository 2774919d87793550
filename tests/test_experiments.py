"""The experiment runner produces the report's study table and scaling data."""

import csv

import numpy as np

from sknlica import experiments

TINY = experiments.StudyConfig(
    n_train=200,
    n_test=100,
    max_iter=2,
    scaling_n=(2, 5),
    scaling_m=(1, 2),
    scaling_fixed_m=2,
    scaling_fixed_n=5,
    scaling_repeats=2,
    scaling_train=150,
)


def test_runner_writes_table_and_csvs(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "ACTIVATIONS", ("relu", "tanh"))
    rows, scaling, seconds, figures = experiments.run(
        TINY, tmp_path, seed=0, verbose=False
    )
    # Both estimators x 2 activations x 2 (m, n) shapes.
    assert len(rows) == 2 * 2 * 2
    assert {r["estimator"] for r in rows} == {"MLE", "VAE"}
    for row in rows:
        assert row["gap"] == row["held_out_ll"] - row["true_ll"]
        assert 0 <= row["latent_disparity"] <= 1
        assert 0 <= row["reconstruction_first_cc"] <= 1
        assert np.isnan(row["elbo"]) == (row["estimator"] == "MLE")
    # 2 estimators x 3 distinct (m, n) settings (the sweeps share (2, 5)) x 2.
    assert len(scaling) == 2 * 3 * 2
    table = (tmp_path / "study.md").read_text()
    assert "| estimator | activation | m | n |" in table
    with (tmp_path / "study.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    with (tmp_path / "scaling.csv").open() as handle:
        dims = {(r["n_components"], r["n_features"]) for r in csv.DictReader(handle)}
    assert dims == {("2", "2"), ("2", "5"), ("1", "5")}
    names = {path.name for path in figures}
    assert names == {
        "reconstruction.png",
        "learning_curves.png",
        "scaling.png",
        "latent_and_observed.png",
    }
    assert all(path.stat().st_size > 10_000 for path in figures)


def test_command_line_entry_point(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "QUICK", TINY)
    monkeypatch.setattr(experiments, "ACTIVATIONS", ("relu",))
    experiments.main(["--quick", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| estimator | activation |" in out
    assert str(tmp_path) in out
