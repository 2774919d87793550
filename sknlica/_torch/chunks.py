"""How much work each evaluation pass does at once: every chunk size, in one place.

Evaluation never needs all rows at once: rows are independent given the
nodes (or draws), so passes run in row chunks whose largest temporary has a
bounded number of entries.  The sizes were measured to keep temporaries in
cache on the CI-class machine (``benchmarks/bench_breakdown.py``); the
results never depend on them beyond round-off.
"""

from __future__ import annotations

#: Entries of the ``rows x nodes`` log-joint matrix of a prior-rule pass
#: (likelihood, posterior means, the MLE's validation score).  The validation
#: pass of a default fit (500 rows x 4,096 nodes) took 32 ms with 2**22,
#: 22 ms with 2**20, 20 ms with this.
PAIRWISE_ELEMENTS = 2**18

#: Entries of the ``draws x rows x width`` temporaries of the encoder's
#: importance-sampling estimate (the VAE's score and per-epoch monitor: 500
#: rows x 64 draws x width 64 took 24 ms with 2**22, 8 ms with this, 9 ms
#: with 2**18).
IMPORTANCE_ELEMENTS = 2**20

#: Decoder evaluations (rows x proposal nodes per row) per chunk of the
#: posterior-adapted rule.
ADAPTIVE_POINTS = 2**16

#: Latents decoded at once when decoding a whole node set, bounding the
#: memory of the decoder's activations.
DECODE_NODES = 8192


def chunk_rows(per_row: int, max_elements: int) -> int:
    """Rows per chunk so that a ``rows x per_row`` temporary stays bounded."""
    return max(1, max_elements // max(1, per_row))
