"""Tables (markdown) and plots of the Llumnix experiment's results (`llumnix.run_experiment`)."""

from __future__ import annotations

import os

POLICY_TITLES = {"rr": "round robin", "infaas": "INFaaS++", "llumnix": "Llumnix", "shunter": "Shunter"}


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}x"


def render_markdown(results: dict) -> str:
    """Every table of the experiment, as markdown."""
    tb = results["testbed"]
    lines = [f"Simulated: {tb['instances']} x {tb['hardware']} serving {tb['model']} "
             f"({tb['kv_blocks_per_instance']} KV blocks of {tb['block_size']} tokens each), "
             f"{tb['requests_per_scenario']:,} requests per run, seed {tb['seed']}."]
    if "wall_seconds" in results:
        lines.append(f"Wall time of the whole run: {results['wall_seconds'] / 60:.1f} min.")
    for key, sc in results["scenarios"].items():
        rr = sc["policies"]["rr"]
        lines += ["", f"### {sc['title']} — {sc['rate']:.2f} requests/s", "",
                  f"Load: the highest rate round robin keeps up with ({len(sc['load_search'])} runs searched); "
                  f"there its P99 TTFT is {_ratio(rr['ttft_p99'], rr['ttft_p50'])} its P50.", "",
                  "| policy | TTFT mean (s) | TTFT P99 (s) | TPOT P99 (ms) | E2E mean (s) | E2E P99 (s) | "
                  "preemption loss (tokens) | migrations | instance-s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in sc["policies"].items():
            lines.append(f"| {POLICY_TITLES.get(name, name)} | {_s(r['ttft_mean'])} | {_s(r['ttft_p99'])} | "
                         f"{_ms(r['tpot_p99'])} | {_s(r['e2e_mean'])} | {_s(r['e2e_p99'])} | "
                         f"{r['preemption_loss_tokens']:,} | {r['migrations']:,} | {r['instance_seconds']:,.0f} |")
        p = sc["policies"]
        lines += ["", f"Ratios: Llumnix vs round robin P99 TTFT {_ratio(p['rr']['ttft_p99'], p['llumnix']['ttft_p99'])}, "
                      f"mean {_ratio(p['rr']['ttft_mean'], p['llumnix']['ttft_mean'])}; "
                      f"Shunter vs Llumnix P99 TTFT {_ratio(p['llumnix']['ttft_p99'], p['shunter']['ttft_p99'])}, "
                      f"P99 TPOT {_ratio(p['shunter']['tpot_p99'], p['llumnix']['tpot_p99'])} of Llumnix's."]
        if "sweep" in sc:
            lines += ["", "The same at lower loads (P99 TTFT in seconds; ratios as above):", "",
                      "| load (req/s) | round robin | INFaaS++ | Llumnix | Shunter | Llumnix vs RR | Shunter vs Llumnix |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            for point in sc["sweep"] + [{"rate": sc["rate"], "policies": p}]:
                q = point["policies"]
                lines.append(f"| {point['rate']:.2f} | " + " | ".join(_s(q[n]["ttft_p99"]) for n in q) +
                             f" | {_ratio(q['rr']['ttft_p99'], q['llumnix']['ttft_p99'])} | "
                             f"{_ratio(q['llumnix']['ttft_p99'], q['shunter']['ttft_p99'])} |")
        if "goodput" in sc:
            g = sc["goodput"]
            slos = sc["slos"]
            lines += ["", f"Goodput (90 % of requests within TTFT {slos['ttft_slo']:.2f} s and TPOT "
                          f"{slos['tpot_slo'] * 1000:.0f} ms, 5x the unloaded P50s): "
                          f"Llumnix {g['llumnix']['rate']:.2f} req/s, Shunter {g['shunter']['rate']:.2f} req/s "
                          f"({_ratio(g['shunter']['rate'], g['llumnix']['rate'])})."]
    if "priorities" in results:
        pr = results["priorities"]
        w, wo = pr["with_priorities"], pr["without_priorities"]
        lines += ["", f"### (d) 10 % high-priority requests (Azure conversation, {pr['rate']:.2f} req/s, "
                      f"{POLICY_TITLES.get(pr['policy'], pr['policy'])}, headroom {pr['headroom_blocks']} blocks)", "",
                  "| | high P99 TTFT (s) | high mean E2E (s) | normal mean TTFT (s) | normal mean E2E (s) |",
                  "|---|---:|---:|---:|---:|",
                  f"| without priorities | {_s(wo['high']['ttft_p99'])} | {_s(wo['high']['e2e_mean'])} | "
                  f"{_s(wo['normal']['ttft_mean'])} | {_s(wo['normal']['e2e_mean'])} |",
                  f"| with priorities | {_s(w['high']['ttft_p99'])} | {_s(w['high']['e2e_mean'])} | "
                  f"{_s(w['normal']['ttft_mean'])} | {_s(w['normal']['e2e_mean'])} |", "",
                  f"High-priority P99 TTFT {_ratio(wo['high']['ttft_p99'], w['high']['ttft_p99'])} better, "
                  f"mean E2E {_ratio(wo['high']['e2e_mean'], w['high']['e2e_mean'])} faster; normal requests' mean "
                  f"TTFT {_ratio(w['normal']['ttft_mean'], wo['normal']['ttft_mean'])} of what it was."]
    if "autoscaling" in results:
        runs = results["autoscaling"]
        first = runs[0]
        lines += ["", f"### (e) Autoscaling between {first['min']} and {first['max']} instances ({first['title']}, "
                      f"{POLICY_TITLES.get(first['policy'], first['policy'])})", "",
                  "| load (req/s) | cluster | TTFT P99 (s) | TTFT mean (s) | instance-s | instance-s saved | P99 TTFT vs fixed |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for au in runs:
            fixed, scaled = au["runs"].values()
            for label, r in au["runs"].items():
                saved = "" if r is fixed else f"{1 - r['instance_seconds'] / fixed['instance_seconds']:.0%}"
                worse = "" if r is fixed else _ratio(r["ttft_p99"], fixed["ttft_p99"])
                lines.append(f"| {au['rate']:.2f} | {label} | {_s(r['ttft_p99'])} | {_s(r['ttft_mean'])} | "
                             f"{r['instance_seconds']:,.0f} | {saved} | {worse} |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, out_dir: str) -> list[str]:
    """One bar chart per metric across scenarios and policies; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scenarios = list(results["scenarios"].items())
    if not scenarios:
        return []
    policies = list(scenarios[0][1]["policies"])
    paths = []
    for metric, label in (("ttft_p99", "P99 TTFT (s)"), ("ttft_mean", "mean TTFT (s)"), ("tpot_p99", "P99 TPOT (s)"),
                          ("e2e_p99", "P99 E2E (s)")):
        fig, ax = plt.subplots(figsize=(11, 4))
        width = 0.8 / len(policies)
        x = np.arange(len(scenarios))
        for k, name in enumerate(policies):
            values = [sc["policies"][name][metric] or 0 for _, sc in scenarios]
            ax.bar(x + k * width, values, width, label=POLICY_TITLES.get(name, name))
        ax.set_xticks(x + width * (len(policies) - 1) / 2, [key for key, _ in scenarios], rotation=15, fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"llumnix-{metric.replace('_', '-')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
