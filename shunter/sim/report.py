"""Reports of a simulation: the JSON document, the human summary, plots and the goodput search.

JSON schema (every latency in seconds, each summary {mean, p50, p90, p99}):

    requests            int    requests in the workload
    completed           int    finished requests
    rejected, unfinished int   could never run / still queued when the run ended
    ttft, tpot, e2e     summary
    slo_attainment      float | null   fraction meeting both SLOs (null: no SLO given)
    preemptions         int    preemption events over all requests
    preempted_requests  int    requests preempted at least once
    preemption_loss_tokens int tokens computed again because of preemption
    migrations          int    committed live migrations (P/D hand-offs included)
    migrations_aborted  int
    migration_downtime  summary | null
    instance_seconds    float  Σ over instances of the seconds each was paid for, from its order (start-up
                               included) to its stop or the run's end (cost); fixed size: instances x makespan
    gpu_seconds         float  instance_seconds x GPUs per instance
    makespan            float  first arrival -> last finish
    throughput          {requests_per_s, output_tokens_per_s}
    instances           [{id, role, requests, steps, busy_fraction, start, ready, drain, stop, seconds}]
                        every instance the run had; role: mixed, prefill or decode; requests: those that
                        finished there; start: ordered, ready: joined dispatch, drain: drained,
                        stop: stopped (null: never / still up at the end); busy_fraction of its own seconds
    pd                  null (no P/D) | {prefill, decode: instances of each role, hand_offs: committed
                        migrations to a decode instance, hand_offs_aborted, not_handed_off: requests whose
                        hand-off could not start (no decode instance took work, or the order was refused)}
    scaling             null (a fixed size) | {actions: [{time, add, drain, freeness}],
                        timeline: [[time, provisioned, serving], ...] where the counts change,
                        mean_instances: instance_seconds / makespan}
    goodput             null | {rate, rate_per_gpu, rate_scale, slo_attainment, searched: [...]}
    config              what was simulated; config.clipping: what max_model_len cut off the workload
                        {max_model_len, num_prompts_clipped, num_prompt_tokens_clipped, num_outputs_clipped,
                        num_output_tokens_clipped}
    simulation          {wall_seconds, events, requests_per_wall_s}
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

from shunter.cluster.disaggregation import MIXED
from shunter.sim.metrics import GOODPUT_ATTAINMENT, slo_attainment, summarize
from shunter.sim.simulator import SimResult
from shunter.sim.workloads import WorkloadRequest


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity


def build_report(result: SimResult, num_requests: int, *, config: dict | None = None,
                 wall_seconds: float | None = None, goodput: dict | None = None) -> dict:
    """The JSON document of one run (see the module docstring)."""
    records = result.records
    num_unserved = len(result.rejected) + len(result.unfinished)
    makespan = result.makespan
    committed = [m for m in result.migrations if m.outcome == "committed"]
    per_instance_requests = {iid: 0 for iid in result.instance_ids}
    for r in records:
        per_instance_requests[r.instance_id] = per_instance_requests.get(r.instance_id, 0) + 1
    output_tokens = sum(r.num_output_tokens for r in records)
    report = {
        "requests": num_requests,
        "completed": len(records),
        "rejected": len(result.rejected),
        "unfinished": len(result.unfinished),
        "ttft": summarize(r.ttft for r in records),
        "tpot": summarize(t for r in records if (t := r.tpot) is not None),
        "e2e": summarize(r.e2e for r in records),
        "slo_attainment": slo_attainment(records, num_unserved),
        "preemptions": sum(r.num_preemptions for r in records),
        "preempted_requests": sum(1 for r in records if r.num_preemptions),
        "preemption_loss_tokens": sum(r.recomputed_tokens for r in records),
        "migrations": len(committed),
        "migrations_aborted": sum(1 for m in result.migrations if m.outcome == "aborted"),
        "migration_downtime": summarize(m.downtime for m in committed) if committed else None,
        "instance_seconds": result.instance_seconds,
        "gpu_seconds": result.instance_seconds * result.gpus_per_instance,
        "makespan": makespan,
        "throughput": {
            "requests_per_s": len(records) / makespan if makespan > 0 else None,
            "output_tokens_per_s": output_tokens / makespan if makespan > 0 else None,
        },
        "instances": [_instance_json(result, iid, per_instance_requests.get(iid, 0)) for iid in result.instance_ids],
        "pd": _pd_json(result) if result.pd is not None else None,
        "scaling": _scaling_json(result) if result.autoscaling else None,
        "goodput": goodput,
        "config": config or {},
        "simulation": {
            "wall_seconds": wall_seconds,
            "events": result.num_events,
            "requests_per_wall_s": num_requests / wall_seconds if wall_seconds else None,
        },
    }
    return report


def _instance_json(result: SimResult, iid: str, num_requests: int) -> dict:
    span = result.instance_spans.get(iid)
    seconds = span.seconds(result.end_time) if span is not None else result.makespan
    out = {"id": iid, "role": result.instance_roles.get(iid, MIXED), "requests": num_requests,
           "steps": result.instance_num_steps[iid],
           "busy_fraction": result.instance_busy_time[iid] / seconds if seconds > 0 else None}
    if span is not None:
        out.update(start=span.start, ready=span.ready, drain=span.drain, stop=span.stop, seconds=seconds)
    return out


def _pd_json(result: SimResult) -> dict:
    return {"prefill": result.pd.num_prefill, "decode": result.pd.num_decode,
            "hand_offs": sum(1 for m in result.hand_offs if m.outcome == "committed"),
            "hand_offs_aborted": sum(1 for m in result.hand_offs if m.outcome == "aborted"),
            "not_handed_off": len(result.hand_off_problems)}


def _scaling_json(result: SimResult) -> dict:
    return {
        "actions": [{"time": t, "add": a.num_add, "drain": a.drain_id, "freeness": _finite(a.freeness)}
                    for t, a in result.scaling_actions],
        "timeline": [list(point) for point in result.instance_timeline()],
        "mean_instances": result.instance_seconds / result.makespan if result.makespan > 0 else None,
    }


def format_summary(report: dict) -> str:
    """A short human table of a report."""
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:9.1f}"

    lines = [f"{'':6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}   (ms)"]
    for key in ("ttft", "tpot", "e2e"):
        s = report[key]
        lines.append(f"{key.upper():6} {ms(s['mean'])} {ms(s['p50'])} {ms(s['p90'])} {ms(s['p99'])}")
    att = report["slo_attainment"]
    lines.append(f"requests {report['completed']}/{report['requests']} completed"
                 + (f", {report['rejected']} rejected" if report["rejected"] else "")
                 + (f", {report['unfinished']} unfinished" if report["unfinished"] else "")
                 + (f"; SLO attainment {att:.1%}" if att is not None else ""))
    lines.append(f"preemptions {report['preemptions']} ({report['preemption_loss_tokens']} tokens recomputed), "
                 f"migrations {report['migrations']}, instance-seconds {report['instance_seconds']:.1f}, "
                 f"makespan {report['makespan']:.1f} s")
    if report.get("pd"):
        pd = report["pd"]
        lines.append(f"P/D {pd['prefill']}:{pd['decode']}: {pd['hand_offs']} hand-offs to decode instances"
                     + (f", {pd['hand_offs_aborted']} aborted" if pd["hand_offs_aborted"] else "")
                     + (f", {pd['not_handed_off']} not started" if pd["not_handed_off"] else ""))
    if report.get("scaling"):
        sc = report["scaling"]
        added = sum(a["add"] for a in sc["actions"])
        drained = sum(1 for a in sc["actions"] if a["drain"] is not None)
        counts = [p[1] for p in sc["timeline"]]
        mean = f"{sc['mean_instances']:.2f}" if sc["mean_instances"] is not None else "-"
        lines.append(f"autoscaling: {added} instances added, {drained} drained; "
                     f"{min(counts, default=0)}..{max(counts, default=0)} provisioned, {mean} on average")
    if report.get("goodput"):
        g = report["goodput"]
        lines.append(f"goodput {g['rate']:.3f} req/s ({g['rate_per_gpu']:.3f} per GPU) at "
                     f"{GOODPUT_ATTAINMENT:.0%} SLO attainment")
    sim = report.get("simulation") or {}
    if sim.get("wall_seconds"):
        lines.append(f"simulated in {sim['wall_seconds']:.2f} s ({sim['requests_per_wall_s']:.0f} requests/s)")
    return "\n".join(lines)


# ---- goodput -------------------------------------------------------------------------------------
def scale_arrivals(workload: Sequence[WorkloadRequest], rate_scale: float) -> list[WorkloadRequest]:
    """The workload with arrival times divided by `rate_scale` (rate multiplied by it)."""
    return [replace(w, arrival_time=w.arrival_time / rate_scale) for w in workload]


def arrival_rate(workload: Sequence[WorkloadRequest]) -> float:
    """(N - 1) / span: the workload's mean request rate."""
    if len(workload) < 2:
        raise ValueError("goodput needs a workload of at least two requests")
    span = workload[-1].arrival_time - workload[0].arrival_time
    if span <= 0:
        raise ValueError("goodput needs requests spread over time (all arrive at once)")
    return (len(workload) - 1) / span


def search_goodput(attainment_at: Callable[[float], float], *, target: float = GOODPUT_ATTAINMENT,
                   rel_tol: float = 0.02, max_runs: int = 16) -> tuple[float, list[tuple[float, float]]]:
    """The highest rate scale whose SLO attainment is >= target, and every (scale, attainment) tried.

    Doubles (or halves) from scale 1 until the target is bracketed, then
    bisects geometrically until the bracket is within `rel_tol`. Assumes
    attainment falls as the rate grows. Returns scale 0 if even 1/1024 fails.
    """
    tried: list[tuple[float, float]] = []

    def ok(scale: float) -> bool:
        a = attainment_at(scale)
        tried.append((scale, a))
        return a >= target

    if ok(1.0):
        lo, hi = 1.0, 2.0
        while len(tried) < max_runs and ok(hi):
            lo, hi = hi, hi * 2
    else:
        lo, hi = 0.5, 1.0
        while not ok(lo):
            hi, lo = lo, lo / 2
            if lo < 1 / 1024:
                return 0.0, tried
    while hi / lo > 1 + rel_tol and len(tried) < max_runs:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried


# ---- plots ------------------------------------------------------------------------------------------
def plot_report(result: SimResult, path: str) -> None:
    """Latency CDFs (TTFT, TPOT, E2E), per-instance load over time and, for an autoscaled run, the number
    of instances over time, to an image file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = 3 if result.autoscaling else 2
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4 * rows))
    series = {
        "TTFT (s)": [r.ttft for r in result.records],
        "TPOT (s)": [t for r in result.records if (t := r.tpot) is not None],
        "E2E (s)": [r.e2e for r in result.records],
    }
    for ax, (label, values) in zip(axes[0], series.items()):
        if values:
            x = np.sort(np.asarray(values))
            ax.plot(x, np.arange(1, len(x) + 1) / len(x))
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    panels = (("used KV blocks", "num_used_blocks"), ("running requests", "num_running"),
              ("waiting requests", "num_waiting"))
    for ax, (label, attr) in zip(axes[1], panels):
        for iid in result.instance_ids:
            samples = result.load_samples.get(iid, [])
            if samples:
                ax.plot([s.time for s in samples], [getattr(s, attr) for s in samples], lw=0.8, label=f"inst {iid}")
        ax.set_xlabel("time (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(result.instance_ids) <= 8:
        axes[1][0].legend(fontsize=7)
    if result.autoscaling:
        for ax in axes[2]:
            ax.remove()
        ax = fig.add_subplot(axes[0][0].get_gridspec()[2, :])
        timeline = result.instance_timeline()
        times = [t for t, _, _ in timeline] + [result.end_time]
        for index, label in ((1, "provisioned (paid for)"), (2, "serving")) if timeline else ():
            counts = [point[index] for point in timeline]
            ax.step(times, counts + counts[-1:], where="post", label=label)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("instances")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(result.records)} requests on {len(result.instance_ids)} instances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
