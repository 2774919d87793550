"""Helpers shared by the benchmark scripts: output files, Markdown tables, and
the measurement plumbing of the performance benchmarks (threads, load, peak
memory of a fresh subprocess, per-epoch times from ``history_``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sknlica import NonlinearICAMLE

RESULTS = Path(__file__).parent / "results"

#: A child process prints its result on one line starting with this marker.
CHILD_MARKER = "BENCH-CHILD-RESULT "


def environment() -> dict:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "load_average_at_write": [round(v, 2) for v in os.getloadavg()],
    }


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a Markdown table; floats with 4 significant digits."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str) -> None:
    """Write ``results/NAME.json`` and ``results/NAME.md``."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"environment": environment(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {RESULTS / name}.json and .md")


# ------------------------------------------------------------ measurement
def load_average() -> float:
    """The one-minute load average (other jobs sharing the CPUs)."""
    return round(os.getloadavg()[0], 2)


def set_threads(threads: int) -> None:
    """Torch intra-op threads for this process (the benchmarks default to 2)."""
    torch.set_num_threads(threads)


def thread_params(estimator_class, threads: int) -> dict:
    """``{"n_threads": threads}`` when the estimator has that parameter."""
    params = estimator_class().get_params()
    return {"n_threads": threads} if "n_threads" in params else {}


def epoch_seconds(history: list[dict]) -> list[float]:
    """Per-epoch seconds from ``history_`` (its ``seconds`` are cumulative)."""
    seconds = [entry["seconds"] for entry in history]
    return [b - a for a, b in zip([0.0, *seconds[:-1]], seconds)]


def median_after_first(values: list[float]) -> float:
    """Median of per-epoch times, dropping the first (warm-up) when possible."""
    values = list(values)
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark that
    ``ru_maxrss`` reports for a single process, except that (a) it can be
    reset (:func:`reset_peak_rss`) and (b) it is this process's own:
    ``ru_maxrss`` of a child started by fork + exec from a large parent
    starts at the *parent's* peak (the kernel carries the replaced memory
    map's high-water mark over at exec), which hid every fit smaller than
    the benchmark process itself.  Elsewhere: ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0).

    Without it the peak of the imports and of the data generation can hide
    a smaller fit.  Returns whether it worked.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_mib() -> float:
    """Current resident set size (Linux ``/proc/self/statm``; else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mib()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(script: str | Path, config: dict, *, timeout: float = 900) -> dict:
    """Run ``python SCRIPT --child JSON`` in a fresh process; return its result.

    A fresh process per configuration is what makes ``ru_maxrss`` a per-fit
    peak.  The child prints one line ``CHILD_MARKER + json``; a failure comes
    back as ``{"error": ...}`` rather than raising, so one bad configuration
    does not lose the others.
    """
    command = [sys.executable, str(script), "--child", json.dumps(config)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: " + " | ".join(tail)}


def child_result(result: dict) -> None:
    """Print a child's result for :func:`run_child` to pick up."""
    print(CHILD_MARKER + json.dumps(result), flush=True)


def ratio_summary(pairs: list[tuple[float, float]]) -> dict:
    """Medians of interleaved (estimator, reference) times and their ratios.

    ``ratio`` is the median of the per-round ratios (each round's two
    measurements were taken back to back, so background load cancels);
    ``ratio_of_medians`` is the plain ratio of the two medians.
    """
    ours = [a for a, _ in pairs]
    reference = [b for _, b in pairs]
    return {
        "seconds": float(np.median(ours)),
        "reference_seconds": float(np.median(reference)),
        "ratio": float(np.median([a / b for a, b in pairs])),
        "ratio_of_medians": float(np.median(ours) / np.median(reference)),
        "ratio_min": float(min(a / b for a, b in pairs)),
        "ratio_max": float(max(a / b for a, b in pairs)),
    }


def busy_cpus(interval: float = 0.25) -> float:
    """CPUs the whole machine kept busy over ``interval`` s (``/proc/stat``).

    Called while this process sleeps, so it is the load of *other* jobs;
    ``nan`` where ``/proc/stat`` does not exist.
    """

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return float("nan")
    busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    return round((os.cpu_count() or 1) * busy, 2)


class QuietWaiter:
    """Wait for other jobs to go quiet, from a total budget of seconds.

    ``wait()`` polls :func:`busy_cpus` until other jobs use less than
    ``threshold`` CPUs or the budget is spent, and returns the last reading
    (recorded with each measurement).  A zero budget only measures.
    """

    def __init__(self, budget_s: float = 0.0, threshold: float = 0.3) -> None:
        self.budget_s = budget_s
        self.threshold = threshold
        self.waited_s = 0.0

    def wait(self) -> float:
        busy = busy_cpus()
        while busy >= self.threshold and self.waited_s < self.budget_s:
            time.sleep(1.0)
            self.waited_s += 1.25
            busy = busy_cpus()
        return busy


def benchmark_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options shared by bench_performance.py and bench_scaling.py."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait for other jobs to use < 0.3 CPUs, "
        "up to SECONDS in total (default 0: measure whatever the load is)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def quiet_fit(model, X):
    """``model.fit(X)`` without the ConvergenceWarning of short fits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X)


def mle_with_decoder(decoder, noise_variance: float, X) -> NonlinearICAMLE:
    """A fitted ``NonlinearICAMLE`` (one epoch on ``X``, for the fitted
    attributes) whose decoder and sigma^2 are replaced: scores any decoder,
    such as the true generator's, with the estimator's accurate rules."""
    model = quiet_fit(
        NonlinearICAMLE(max_iter=1, early_stopping=False, random_state=0), X
    )
    model.decoder_ = decoder
    model.noise_variance_ = noise_variance
    return model
