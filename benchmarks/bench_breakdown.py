"""Where the estimators' extra time per epoch goes, cost by cost.

Target: explain the per-epoch gap between each estimator and its minimal
hand-written torch loop that ``bench_speed.py`` measures (``make_nonlinear_ica``,
m=2, n=20, N=5,000 rows, batch 128, 1,024 nodes; targets 1.3x for the MLE and
1.2x for the VAE), so that each cost can be judged on its own.

How: microbenchmarks, each the minimum over 15 batches of repeated calls
(functions compared with each other take turns batch by batch, so drift in
the machine's speed hits them alike), times its calls per epoch (40 steps).

* The step: the estimator's own bare training step against the minimal
  loop's, on the same 40 minibatches, with ``torch.profiler``'s count of aten
  operator calls.  The estimator's step is built from the numeric layer with
  the estimator's default settings, as its ``fit`` builds it
  (``_common.mle_training_objects`` / ``vae_training_objects``:
  ``MLEModel(make_mlp(...), NoiseVariance(...))`` or ``VAEModel(GaussianHead,
  ...)``, ``make_mle_objective(...)`` or ``VAEObjective(...)``,
  ``make_optimizer(...)``), and timed as
  ``sknlica._torch.training.optimizer_step(model, objective, optimizers,
  batch)``; ``matches_estimator`` records that its modules print as a fitted
  estimator's ``decoder_`` (and ``encoder_``, ``noise_``) do.  The minimal
  loops are those of ``bench_speed.py``.
* Inside the step: node draws (MLE; the objective's ``sampler.draw``), the
  likelihood's forward and backward on fixed decoded nodes (MLE), gradient
  clipping (``clip_gradient_norm``, the VAE objective's ``before_step``) and
  the soft clamp of the encoder log-variances (VAE).
* Around the step, what ``sknlica._torch.training.run_epoch`` adds per step:
  the running loss sum (``total += loss``: one scalar kept per epoch, not a
  list of per-step losses) and the parameter-average update
  (``ParameterAverage.update``, default ``ema_decay=0.998``); and what
  ``train`` adds per epoch: the mean loss (``(total / n).item()``),
  ``is_finite(model)``, swapping the averaged parameters in and out
  (``ParameterAverage.applied``), the objective's ``epoch_scores`` without a
  validation set (the VAE's importance-sampled monitor of 500 training rows;
  the MLE's is free), the best-epoch ``state_dict`` copy and
  ``float(model.noise())`` for ``history_``.
* A check on the per-step plumbing: one whole ``run_epoch`` (with the
  average) against the same number of bare steps on pre-gathered
  minibatches, paired.

``gap_ms``, the measured per-epoch difference, comes from ``speed.json``
(``speed_quick.json`` with ``--quick``) in the output directory when
``bench_speed.py`` wrote one there.

Benchmarks measure and report; nothing here asserts.

Run: ``python benchmarks/bench_breakdown.py [--quick] [--output DIR]
[--threads T] [--wait-quiet SECONDS]`` (``--quick``: 512 rows, 256 nodes, two
repeats, one configuration per code path: seconds).  Writes
``DIR/breakdown.json`` and ``.md`` (``breakdown_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import torch
from _common import (
    BATCH,
    DTYPES,
    FRESH_RULES,
    FULL,
    N_COMPONENTS,
    QUICK,
    QuietWaiter,
    SectionClock,
    bare_training,
    benchmark_parser,
    config_label,
    estimator_for,
    estimator_params,
    finish_settings,
    load_averages,
    make_data,
    markdown_table,
    minimal_for,
    mle_configs,
    paired_per_call_us,
    per_call_us,
    quiet_fit,
    same_modules,
    set_threads,
    timed_run,
    vae_configs,
    write_results,
)

from sknlica._torch.averaging import ParameterAverage
from sknlica._torch.likelihood import GRADIENTS
from sknlica._torch.models import ENCODER_LOG_VAR_RANGE
from sknlica._torch.networks import soft_clamp
from sknlica._torch.training import TrainingRows, clip_gradient_norm, is_finite
from sknlica._torch.training import run_epoch as training_run_epoch
from sknlica._torch.vae_objectives import GRADIENT_CLIP_NORM


def aten_ops_per_call(fn, calls: int = 5) -> float:
    """Aten operator calls (nested ones included) per call of ``fn``."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(calls):
            fn()
    events = p.key_averages()
    return sum(e.count for e in events if e.key.startswith("aten::")) / calls


def _cycling(step, batches):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(batches)
        return step(batches[state["i"]])

    return call


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()

    return call


def _epoch_batches(x):
    """One epoch's minibatches of ``x`` (the last one partial), shuffled."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    return [x[order[i : i + BATCH]] for i in range(0, x.shape[0], BATCH)]


def _matches_estimator(kind, config, X, bare, *, sizes) -> bool:
    """Do the rebuilt modules print as those of a one-epoch fit?"""
    estimator_class, params = estimator_for(kind, config, n_nodes=sizes.nodes)
    params = estimator_params(estimator_class, 1, max_iter=1, **params)
    return same_modules(bare.model, quiet_fit(estimator_class(**params), X[:256]))


def breakdown_start(kind: str, config, X, *, sizes) -> SimpleNamespace:
    """What both breakdowns start from: the estimator's training objects, the
    minimal step, one epoch of minibatches, and ``out`` holding ``config``,
    the paired step timings and the per-step and per-epoch plumbing of
    ``run_epoch`` and ``train``."""
    x = torch.from_numpy(X)
    bare = bare_training(kind, x, config, n_nodes=sizes.nodes)
    torch.manual_seed(0)
    min_step = minimal_for(kind, x, config, n_nodes=sizes.nodes)
    batches = _epoch_batches(x)
    timing = {"reps": sizes.reps, "repeats": sizes.repeats}
    out = {
        **config,
        "matches_estimator": _matches_estimator(kind, config, X, bare, sizes=sizes),
    }
    est_call, min_call = _cycling(bare.step, batches), _cycling(min_step, batches)
    out.update(
        paired_per_call_us({"step_us": est_call, "minimal_step_us": min_call}, **timing)
    )
    out["aten_ops_per_step"] = aten_ops_per_call(est_call)
    out["minimal_aten_ops_per_step"] = aten_ops_per_call(min_call)
    start = SimpleNamespace(
        x=x, bare=bare, batches=batches, out=out, timing=timing, sizes=sizes
    )
    out.update(plumbing(start))
    return start


def plumbing(start) -> dict:
    """What ``run_epoch`` adds around each step and ``train`` after each epoch."""
    bare, x, timing = start.bare, start.x, start.timing
    model, objective = bare.model, bare.objective
    loss = bare.step(start.batches[0])
    total = torch.zeros((), dtype=x.dtype)
    average = ParameterAverage(model, bare.params["ema_decay"])
    steps = len(start.batches)

    def running_sum():
        nonlocal total
        total += loss

    out = {}
    out["running_sum_us"] = per_call_us(
        running_sum, reps=5 * start.sizes.reps, repeats=timing["repeats"]
    )
    out["average_update_us"] = per_call_us(average.update, **timing)
    rows = TrainingRows(x)

    def averaged_swap():
        with average.applied():
            pass

    def epoch_scores():
        model.eval()
        with torch.no_grad():
            objective.epoch_scores(model, rows, None, 0.0)
        model.train()

    per_epoch = {
        "mean_item": lambda: (total / steps).item(),
        "is_finite": lambda: is_finite(model),
        "averaged_swap": averaged_swap,
        "epoch_scores": epoch_scores,
        "state_dict_deepcopy": lambda: copy.deepcopy(model.state_dict()),
        "noise_float": _no_grad(lambda: float(model.noise())),
    }
    epoch_reps = max(2, timing["reps"] // 4)
    for name, fn in per_epoch.items():
        out[f"{name}_us"] = per_call_us(fn, reps=epoch_reps, repeats=timing["repeats"])
    # The check: a whole run_epoch against as many bare steps.
    generator = torch.Generator().manual_seed(2)

    def whole_epoch():
        training_run_epoch(
            model,
            objective,
            bare.optimizers,
            rows,
            generator,
            batch_size=bare.params["batch_size"],
            track_rows=True,
            average=average,
        )

    def bare_steps():
        for batch in start.batches:
            bare.step(batch)

    epochs = paired_per_call_us(
        {"run_epoch_us": whole_epoch, "bare_steps_us": bare_steps},
        reps=1,
        repeats=max(2, timing["repeats"] // 3),
    )
    out.update(epochs)
    return out


def mle_breakdown(config, X, *, sizes) -> dict:
    """Microbenchmarks of each cost the MLE has beyond the minimal loop."""
    start = breakdown_start("mle", config, X, sizes=sizes)
    x, batches, out, timing = start.x, start.batches, start.out, start.timing
    model, objective = start.bare.model, start.bare.objective
    draw_timing = {**timing, "reps": 5 * timing["reps"]}
    # Node draw: the estimator's sampler against the minimal loop's.
    if config["rule"] in FRESH_RULES:
        draws = paired_per_call_us(
            {
                "draw_us": objective.sampler.draw,
                "minimal_draw_us": lambda: torch.randn(
                    sizes.nodes, N_COMPONENTS, dtype=x.dtype
                ),
            },
            **draw_timing,
        )
        out.update(draws)
    else:
        out["draw_us"] = per_call_us(objective.sampler.draw, **draw_timing)
        out["minimal_draw_us"] = 0.0
    # The likelihood's forward and backward on fixed decoded nodes.
    nodes, log_w = objective.sampler.draw()
    g = model.decoder(nodes).detach().requires_grad_()
    raw = torch.zeros((), dtype=x.dtype, requires_grad=True)
    xb, n = batches[0], x.shape[1]
    gradient = GRADIENTS[config["gradient"]]

    def ours():
        gradient(xb, g, log_w, raw.exp()).mean().backward()

    def theirs():
        s2 = raw.exp()
        sq = (xb * xb).sum(1, keepdim=True) - 2 * xb @ g.T + (g * g).sum(1)
        log_joint = log_w - 0.5 * (n * torch.log(2 * math.pi * s2) + sq / s2)
        torch.logsumexp(log_joint, 1).mean().backward()

    out.update(
        paired_per_call_us(
            {"likelihood_us": ours, "minimal_likelihood_us": theirs}, **timing
        )
    )
    return summarise(out, len(batches))


def vae_breakdown(config, X, *, sizes) -> dict:
    """Microbenchmarks of each cost the VAE has beyond the minimal loop."""
    start = breakdown_start("vae", config, X, sizes=sizes)
    x, batches, out, timing = start.x, start.batches, start.out, start.timing
    # Gradient clipping as the objective's before_step does it (after a
    # backward, so the gradients exist).
    start.bare.step(batches[0])
    optimizer = start.bare.optimizers[0]
    out["clip_grad_norm_us"] = per_call_us(
        lambda: clip_gradient_norm(optimizer, GRADIENT_CLIP_NORM), **timing
    )
    # Soft clamp of the encoder log-variances, forward and backward.
    log_var = torch.zeros(BATCH, N_COMPONENTS, dtype=x.dtype, requires_grad=True)
    clamp = paired_per_call_us(
        {
            "with": lambda: (
                soft_clamp(log_var, *ENCODER_LOG_VAR_RANGE).sum().backward()
            ),
            "without": lambda: log_var.sum().backward(),
        },
        **{**timing, "reps": 5 * timing["reps"]},
    )
    out["soft_clamp_us"] = clamp["with"] - clamp["without"]
    return summarise(out, len(batches))


#: Per-step costs inside ``optimizer_step`` (the rest is ``step_rest``).
IN_STEP = {
    "node_draw": ("draw_us", "minimal_draw_us"),
    "likelihood_fwd_bwd": ("likelihood_us", "minimal_likelihood_us"),
    "clip_grad_norm": ("clip_grad_norm_us", None),
    "soft_clamp": ("soft_clamp_us", None),
}
#: Per-step costs of ``run_epoch`` around the step.
AROUND_STEP = {"running_sum": "running_sum_us", "average_update": "average_update_us"}
#: Per-epoch costs of ``run_epoch`` and ``train``.
PER_EPOCH = (
    "mean_item",
    "is_finite",
    "averaged_swap",
    "epoch_scores",
    "state_dict_deepcopy",
    "noise_float",
)


def summarise(out: dict, steps: int) -> dict:
    """Per-epoch milliseconds of each cost, from the per-call microseconds."""
    ms = {"step_total": steps * (out["step_us"] - out["minimal_step_us"]) / 1e3}
    for name, (ours, theirs) in IN_STEP.items():
        if ours in out:
            ms[name] = steps * (out[ours] - (out[theirs] if theirs else 0.0)) / 1e3
    ms["step_rest"] = ms["step_total"] - sum(ms[k] for k in IN_STEP if k in ms)
    for name, key in AROUND_STEP.items():
        ms[name] = steps * out[key] / 1e3
    for name in PER_EPOCH:
        ms[name] = out[f"{name}_us"] / 1e3
    ms["explained_total"] = sum(v for k, v in ms.items() if k != "step_total")
    # The check: run_epoch beyond its bare steps, against the named parts.
    ms["run_epoch_plumbing_measured"] = (
        out["run_epoch_us"] - out["bare_steps_us"]
    ) / 1e3
    ms["run_epoch_plumbing_named"] = sum(ms[k] for k in AROUND_STEP) + ms["mean_item"]
    out["steps_per_epoch"] = steps
    out["per_epoch_ms"] = ms
    return out


# ------------------------------------------------------------------- main
def run_sections(args) -> dict:
    sizes = QUICK if args.quick else FULL
    waiter = QuietWaiter(args.wait_quiet)
    out = {
        "settings": {
            "rows": sizes.rows,
            "nodes": sizes.nodes,
            "reps": sizes.reps,
            "repeats": sizes.repeats,
            "threads": args.threads,
            "load_average_start": load_averages(),
        }
    }
    data = {name: make_data(sizes.rows, dtype=dtype) for name, dtype in DTYPES.items()}
    clock = SectionClock()
    sections = (
        ("breakdown_mle", "mle", mle_breakdown, mle_configs(args.quick)),
        ("breakdown_vae", "vae", vae_breakdown, vae_configs(args.quick)),
    )
    for key, kind, breakdown, configs in sections:
        clock.mark(f"{kind.upper()} breakdown (microbenchmarks)")
        out[key] = []
        for config in configs:
            if config.get("rule") == "adaptive":
                continue
            waiter.wait()
            row = breakdown(config, data[config["dtype"]], sizes=sizes)
            out[key].append(row)
            print(row, flush=True)
    finish_settings(out["settings"], waiter, clock)
    return out


# --------------------------------------------------------------- markdown
COST_NOTES = {
    "node_draw": "node draw per step (the objective's `PriorNodeSampler.draw`): "
    "QMC adds a random shift to the Sobol set and maps it through `ndtri` in "
    "float64, Monte Carlo draws float64 `randn`, both then cast; grid and "
    "Gauss-Hermite return fixed tensors. Minimal loop: float `randn` or nothing",
    "likelihood_fwd_bwd": "likelihood forward + backward: centring x and g on "
    "the batch mean (float32 accuracy) and the fused `addmm` of "
    "`pairwise_log_joint`; the analytic gradient's custom Function recomputes "
    "the log-joint and four products in backward. Negative = faster than the "
    "minimal expansion",
    "clip_grad_norm": "gradient clipping every step (`clip_gradient_norm`, the "
    "objective's `before_step`: one foreach norm, a `float()` sync, a rescale "
    "only when the 1e3 cap binds, which it never does here)",
    "soft_clamp": "soft clamp of the encoder log-variances (two `softplus` "
    "and their backward on 128 x 2)",
    "step_rest": "rest of the step (whole-step difference minus the named "
    "parts above): Python dispatch through `optimizer_step` and the "
    "objective's `loss`, `NoiseVariance` (floor + exp), the draws from a "
    "`torch.Generator`, `log_importance_weights` vs the inline formula, "
    "`zero_grad(set_to_none=True)`, and timing noise",
    "running_sum": "`total += loss` after every step (`run_epoch` keeps one "
    "running sum per epoch)",
    "average_update": "`ParameterAverage.update()` after every step (one "
    "`_foreach_lerp_` over the parameters; default `ema_decay=0.998`)",
    "mean_item": "`(total / n_batches).item()` at the end of each epoch",
    "is_finite": "`is_finite(model)`: `isfinite().all()` and a `bool()` per "
    "parameter tensor, every epoch",
    "averaged_swap": "`ParameterAverage.applied()`: the averaged parameters "
    "copied in for the epoch's scores and the current ones back",
    "epoch_scores": "the objective's `epoch_scores` without a validation set, "
    "which runs even with `early_stopping=False` (VAE: importance-sampled log "
    "p(x) and ELBO of 500 training rows with 64 QMC draws, 32,000 decoder "
    "evaluations, while an epoch of IWAE K=8 steps makes 40,000 with "
    "backward, of 1-draw ELBO steps 5,000; MLE: the epoch's mean loss only)",
    "state_dict_deepcopy": "`copy.deepcopy(model.state_dict())` each epoch "
    "the monitored score improves (every epoch early in training)",
    "noise_float": "`float(model.noise())` for the history entry",
}


def load_gaps(args) -> tuple[dict, str]:
    """Measured per-epoch gaps by configuration, from ``speed*.json``."""
    path = args.output / ("speed_quick.json" if args.quick else "speed.json")
    try:
        speed = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, f"no `{path.name}` in the output directory"
    rows = speed.get("mle", []) + speed.get("vae", [])
    return {config_label(r): r["gap_ms"] for r in rows if "gap_ms" in r}, path.name


def render(out: dict, gaps: dict, gap_source: str) -> str:
    s = out["settings"]
    md = [
        "# Breakdown: where the estimators' extra time per epoch goes",
        "",
        f"`make_nonlinear_ica`, m=2, n=20, N={s['rows']:,} rows, batch "
        f"{BATCH}, {s['nodes']} nodes, {s['threads']} torch threads. Load "
        f"average (1/5/15 min) at start {s['load_average_start']}, at end "
        f"{s['load_average_end']}.",
        "",
        f"Each cost is a microbenchmark (minimum over {s['repeats']} batches "
        "of repeated calls, so it is the unloaded cost) times its calls per "
        "epoch; the step totals are the estimator's own bare step "
        "(`optimizer_step` on the model, objective and optimizers built from "
        "the numeric layer with the estimator's defaults; `matches_estimator`: "
        "its modules print as a fitted estimator's) against the minimal "
        "step, on the same minibatches. `gap_ms` is the measured per-epoch "
        f"difference of `bench_speed.py` ({gap_source}; under whatever load "
        "there was); `explained_ms` is the sum of the per-epoch costs after "
        "it. `run_epoch_plumbing_measured`: one whole `run_epoch` minus as "
        "many bare steps (paired), to compare with "
        "`run_epoch_plumbing_named` (running sum + average update + mean "
        "item). Aten ops per step are counted by `torch.profiler` (nested "
        "calls included).",
        "",
    ]
    table, keys = [], []
    for row in out["breakdown_mle"] + out["breakdown_vae"]:
        ms = row["per_epoch_ms"]
        entry = {
            "config": config_label(row),
            "matches_estimator": row["matches_estimator"],
            "gap_ms": gaps.get(config_label(row), ""),
            "explained_ms": ms["explained_total"],
            "step_us": f"{row['step_us']:.0f} vs {row['minimal_step_us']:.0f}",
            "aten_ops": f"{row['aten_ops_per_step']:.0f} vs "
            f"{row['minimal_aten_ops_per_step']:.0f}",
        }
        for key, value in ms.items():
            if key != "explained_total":
                entry[key] = value
                keys += [key] if key not in keys else []
        table.append(entry)
    if table:
        columns = ["config", "matches_estimator", "gap_ms", "explained_ms"]
        md += [markdown_table(table, [*columns, "step_us", "aten_ops", *keys]), ""]
    for row in out["breakdown_mle"][:1] + out["breakdown_vae"][:1]:
        md += [f"One line per cost, {config_label(row)} (ms per epoch):", ""]
        for key, value in row["per_epoch_ms"].items():
            if key in COST_NOTES:
                md.append(f"- {value:+.2f} ms: {COST_NOTES[key]}.")
        md.append("")
    return "\n".join(md)


def main() -> None:
    args = benchmark_parser(__doc__).parse_args()
    set_threads(args.threads)
    out = timed_run(run_sections, args)
    gaps, source = load_gaps(args)
    markdown = render(out, gaps, source)
    write_results("breakdown", out, markdown, output=args.output, quick=args.quick)


if __name__ == "__main__":
    main()
