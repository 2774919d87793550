"""The `make demo` job runs end to end (on a shrunken problem)."""

from sknlica import demo


def test_demo_fits_both_estimators_and_formats_a_table(monkeypatch):
    monkeypatch.setattr(demo, "N_TRAIN", 300)
    monkeypatch.setattr(demo, "N_TEST", 100)
    rows = demo.run(activations=("relu",))
    assert [row["estimator"] for row in rows] == ["MLE", "VAE"]
    for row in rows:
        assert row["gap"] == row["held-out log p(x)"] - row["true model"]
        assert 0 <= row["latent disparity"] <= 1
    table = demo.format_table(rows)
    assert table.splitlines()[0].startswith("| activation | estimator |")
    assert len(table.splitlines()) == 2 + len(rows)
