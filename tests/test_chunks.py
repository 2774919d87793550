"""``sknlica._torch.chunks``: row-chunk sizes bound every temporary."""

from __future__ import annotations

import pytest
from _properties import property_settings
from hypothesis import given
from hypothesis import strategies as st

from sknlica._torch import chunks

PROPERTY = property_settings(30)


@pytest.mark.parametrize(
    ("n_nodes", "max_elements", "rows"),
    [(10, 100, 10), (10, 105, 10), (10, 5, 1), (1, 7, 7), (1000, 2**22, 4194)],
)
def test_chunk_rows(n_nodes, max_elements, rows):
    assert chunks.chunk_rows(n_nodes, max_elements) == rows


@PROPERTY
@given(n_nodes=st.integers(1, 10_000), max_elements=st.integers(1, 10**7))
def test_chunk_rows_bounds_the_temporary(n_nodes, max_elements):
    rows = chunks.chunk_rows(n_nodes, max_elements)
    assert rows >= 1
    if n_nodes <= max_elements:
        assert rows * n_nodes <= max_elements < (rows + 1) * n_nodes


def test_chunk_rows_of_an_empty_row_is_the_whole_budget():
    # per_row = 0 (e.g. no nodes) must not divide by zero.
    assert chunks.chunk_rows(0, 64) == 64


def test_chunk_sizes_are_positive_integers():
    for name in (
        "PAIRWISE_ELEMENTS",
        "IMPORTANCE_ELEMENTS",
        "ADAPTIVE_POINTS",
        "DECODE_NODES",
    ):
        value = getattr(chunks, name)
        assert isinstance(value, int) and value >= 1, name
