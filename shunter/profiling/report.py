"""What `shunter profile` prints and keeps about its fit: the measured table against the fit, and a summary."""

from __future__ import annotations

import statistics

from shunter.profiling.profiler import GridPoint

COEFFICIENT_UNITS = {
    "intercept": (1e-3, "ms"),
    "prefill_tokens": (1e-6, "us/token"),
    "prefill_attention_pairs": (1e-9, "ns/pair"),
    "prefill_chunks": (1e-3, "ms/chunk"),
    "prefill_cached_tokens": (1e-6, "us/cached token"),
    "num_decodes": (1e-6, "us/decode"),
    "sum_decode_context": (1e-9, "ns/context token"),
}


def format_report(model, points: list[GridPoint], held_out: list) -> str:
    """The measured table with the fit's predictions, its coefficients and its errors."""
    lines = [f"{'kind':<8} {'point':<34} {'mean ms':>11} {'spread':>7} {'fit ms':>8} {'error':>7}"]
    errors = []
    for p in points:
        s = p.step
        predicted = model.step_time(s.prefill, s.num_decodes, s.sum_decode_context)
        err = (predicted - s.seconds) / s.seconds
        errors.append(abs(err))
        spread = (max(p.samples) - min(p.samples)) / s.seconds if len(p.samples) > 1 else 0.0
        lines.append(f"{p.kind:<8} {p.label:<34} {s.seconds * 1e3:>11.1f} {spread:>6.0%} "
                     f"{predicted * 1e3:>8.1f} {err:>+7.1%}")
    lines.append("")
    lines.append("fit: seconds = intercept + the sum of coefficient x feature (non-negative least squares):")
    for name, value in model.coefficients.items():
        scale, unit = COEFFICIENT_UNITS[name]
        lines.append(f"  {name:<24} {value / scale:>9.3f} {unit}")
    lines.append(f"  relative error on the {len(points)} grid points: mean {statistics.fmean(errors):.1%}, "
                 f"max {max(errors):.1%}")
    if held_out:
        held = [abs(model.step_time(s.prefill, s.num_decodes, s.sum_decode_context) - s.seconds) / s.seconds
                for s in held_out]
        lines.append(f"  held-out fill steps ({len(held)}, measured once each): mean error {statistics.fmean(held):.1%}, "
                     f"median {statistics.median(held):.1%}")
    return "\n".join(lines)


def fit_summary(model, points: list[GridPoint], held_out: list) -> dict:
    """The fit's coefficients and its relative errors on the grid points and the held-out steps."""
    def errors(steps):
        return [abs(model.step_time(s.prefill, s.num_decodes, s.sum_decode_context) - s.seconds) / s.seconds
                for s in steps]

    grid_errors = errors([p.step for p in points])
    summary = {"coefficients": model.coefficients, "grid_mean_error": statistics.fmean(grid_errors),
               "grid_max_error": max(grid_errors)}
    if held_out:
        held = errors(held_out)
        summary.update(held_out_mean_error=statistics.fmean(held), held_out_median_error=statistics.median(held))
    return summary

