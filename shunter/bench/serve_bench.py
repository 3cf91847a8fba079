"""`shunter bench serve`: load an OpenAI-compatible server (Shunter's, vLLM's) and time every token.

    shunter bench serve --url http://127.0.0.1:8000 --rate 4 --requests 200 --max-concurrency 32
    shunter bench serve --url http://127.0.0.1:8000 --trace azure2023_conv --time-scale 0.5 --endpoint chat

Requests stream (`ignore_eos`, exactly `max_tokens` tokens each) from one
keep-alive HTTP client; the figures are request and token throughput and
TTFT / TPOT / ITL / E2E mean and percentiles. The baseline, measured in the
same run just before, is the server itself unloaded: a few sequential
requests of the same lengths; the main run's P50 TTFT and TPOT are printed
as ratios to it. Only loopback servers are accepted, and the run is bounded
by --requests and --timeout. The measurement core (`serve_load.run_load`,
`serve_metrics.summarize`) is importable without this CLI.
"""

from __future__ import annotations

import argparse

from shunter.sim.cli import HelpFormatter

DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 64


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("serve", help="load an OpenAI-compatible server: throughput, TTFT/TPOT/ITL/E2E",
                                    description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000 (loopback only)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="model name to send (default: the first id of GET /v1/models)")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"],
                   help="/v1/completions or /v1/chat/completions")
    p.add_argument("--api-key", default=None, metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=200, metavar="N", help="number of requests")
    w.add_argument("--trace", default=None, metavar="NAME",
                   help="replay a built-in trace's arrival times and lengths (azure2023_conv, azure2023_code, "
                        "mooncake_conversation, ...; sharegpt: lengths only)")
    w.add_argument("--rate", type=float, default=None, metavar="R",
                   help="requests/s, Poisson (inf: all at once; default: the trace's clock, else inf); "
                        "with a timed trace, rescales its clock to this mean rate")
    w.add_argument("--time-scale", type=float, default=1.0, metavar="S",
                   help="multiply a trace's arrival times by this (0.5 replays twice as fast)")
    w.add_argument("--input-len", type=int, default=None, metavar="L",
                   help=f"random prompt length in tokens (words), without --trace (default {DEFAULT_INPUT_LEN})")
    w.add_argument("--output-len", type=int, default=None, metavar="L",
                   help=f"random output length, without --trace (default {DEFAULT_OUTPUT_LEN})")
    w.add_argument("--range-ratio", type=float, default=0.0, metavar="R",
                   help="random lengths are uniform in [L(1 - r), L(1 + r)]")
    w.add_argument("--max-model-len", type=int, default=2048, metavar="L",
                   help="clip lengths so that prompt + output fit; a word is about a token, leave headroom")
    w.add_argument("--seed", type=int, default=0, metavar="S", help="seeds lengths, arrivals and prompt words")
    r = p.add_argument_group("run")
    r.add_argument("--max-concurrency", type=int, default=None, metavar="C",
                   help="at most this many requests in flight")
    r.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="seconds for the whole command; requests still out then are cancelled, counted as errors")
    r.add_argument("--baseline-requests", type=int, default=5, metavar="N",
                   help="sequential unloaded requests measured first, as the baseline")
    r.add_argument("--no-baseline", action="store_true", help="skip the unloaded baseline")
    r.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="write the figures, the baseline and every request's record here")
    r.add_argument("--plot", dest="plot_path", default=None, metavar="PATH", help="write TTFT and TPOT CDFs here")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import asyncio

    from shunter.bench.serve_load import check_loopback_url
    from shunter.bench.serve_metrics import summarize
    from shunter.bench.serve_workload import build_requests
    from shunter.errors import CLIError

    check_loopback_url(args.url)  # before anything else: nothing may be sent off this machine
    try:
        import aiohttp  # noqa: F401  (the one client library the load generator needs)
    except ModuleNotFoundError:
        raise CLIError("shunter bench serve needs aiohttp (the serve extra): pip install 'shunter[serve]'") from None
    _check_args(args)
    workload = _workload(args)
    requests, clipping = build_requests(workload)
    baseline, main = asyncio.run(_measure(args, requests))
    summary = summarize(main.records, main.duration_s)
    baseline_summary = None if baseline is None else summarize(baseline.records, baseline.duration_s)
    print(format_report(args, main, workload.describe(), clipping.summary(len(requests)), summary, baseline_summary))
    if args.json_path:
        _write_json(args.json_path, args, workload, clipping, main, summary, baseline, baseline_summary)
    if args.plot_path:
        plot_cdfs(args.plot_path, main.records, None if baseline is None else baseline.records)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    from shunter.errors import CLIError

    if args.trace is not None and (args.input_len is not None or args.output_len is not None):
        raise CLIError("--input-len/--output-len set random lengths; --trace takes its lengths from the trace")
    for flag, value, minimum in (("--requests", args.requests, 1), ("--max-concurrency", args.max_concurrency, 1),
                                 ("--input-len", args.input_len, 1), ("--output-len", args.output_len, 1),
                                 ("--baseline-requests", args.baseline_requests, 0), ("--seed", args.seed, 0)):
        if value is not None and value < minimum:
            raise CLIError(f"{flag} must be at least {minimum}, got {value}")
    if not args.timeout > 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.time_scale != 1.0 and (args.trace is None or args.rate is not None):
        raise CLIError("--time-scale applies only to a --trace replayed on its own clock, without --rate")


def _workload(args: argparse.Namespace):
    from shunter.bench.serve_workload import ServeWorkload

    return ServeWorkload(num_requests=args.requests, trace=args.trace, rate=args.rate, time_scale=args.time_scale,
                         input_len=args.input_len or DEFAULT_INPUT_LEN,
                         output_len=args.output_len or DEFAULT_OUTPUT_LEN, range_ratio=args.range_ratio,
                         max_model_len=args.max_model_len, seed=args.seed)


async def _measure(args: argparse.Namespace, requests):
    """(baseline or None, main run) within one --timeout: the baseline first, so the server is idle for it."""
    import time

    from shunter.bench.serve_load import LoadConfig, run_load
    from shunter.bench.serve_workload import baseline_requests

    deadline = time.perf_counter() + args.timeout
    model = args.model
    baseline = None
    if not args.no_baseline and args.baseline_requests:
        shape = baseline_requests(requests, args.baseline_requests, args.seed)
        baseline = await run_load(LoadConfig(args.url, shape, model, args.endpoint, max_concurrency=1,
                                             timeout_s=args.timeout, api_key=args.api_key))
        model = baseline.model
    remaining = max(deadline - time.perf_counter(), 1e-3)  # a spent deadline still records every request
    main = await run_load(LoadConfig(args.url, requests, model, args.endpoint, args.max_concurrency,
                                     timeout_s=remaining, api_key=args.api_key))
    return baseline, main


def format_report(args: argparse.Namespace, main, workload_line: str, clipping_line: str | None, summary: dict,
                  baseline: dict | None) -> str:
    """The printed report: what ran, counts, throughput, the latency table and the baseline ratios."""
    concurrency = f"max concurrency {args.max_concurrency}" if args.max_concurrency else "no concurrency limit"
    lines = [f"shunter bench serve: {args.url} model {main.model}, /v1/{_path(main.endpoint)}, {concurrency}",
             f"  workload: {workload_line}"]
    if clipping_line:
        lines.append(f"  {clipping_line}")
    errors = ", ".join(f"{kind} {n}" for kind, n in summary["errors_by_kind"].items())
    lines.append(f"  requests {summary['num_requests']}   completed {summary['num_completed']}   "
                 f"errors {summary['num_errors']}" + (f" ({errors})" if errors else ""))
    lines.append(f"  duration {summary['duration_s']:.2f} s   requests/s {_num(summary['request_throughput'], 2)}   "
                 f"output tok/s {_num(summary['output_throughput'], 1)}   "
                 f"total tok/s {_num(summary['total_token_throughput'], 1)}   "
                 f"({summary['num_input_tokens']:,} prompt + {summary['num_output_tokens']:,} output tokens)")
    lines.append(f"  {'(ms)':6}{'mean':>10}{'P50':>10}{'P90':>10}{'P99':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        stats = summary[f"{name}_ms"]
        lines.append(f"  {name.upper():6}" + "".join(f"{_num(stats[k], 2):>10}" for k in ("mean", "p50", "p90", "p99")))
    lines += _baseline_lines(args, summary, baseline)
    return "\n".join(lines)


def _baseline_lines(args: argparse.Namespace, summary: dict, baseline: dict | None) -> list[str]:
    from shunter.bench.serve_metrics import p50_ratios

    if baseline is None:
        return ["  baseline: none (--no-baseline)"]
    ratios = p50_ratios(summary, baseline)
    failed = f", {baseline['num_errors']} failed" if baseline["num_errors"] else ""
    return [f"  baseline, same run: {baseline['num_requests']} sequential requests to the unloaded server{failed}: "
            f"TTFT P50 {_num(baseline['ttft_ms']['p50'], 2)} ms, TPOT P50 {_num(baseline['tpot_ms']['p50'], 2)} ms",
            f"  under load / unloaded, P50: TTFT x{_num(ratios['ttft'], 2)}   TPOT x{_num(ratios['tpot'], 2)}"]


def _path(endpoint: str) -> str:
    return "chat/completions" if endpoint == "chat" else "completions"


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _write_json(path: str, args, workload, clipping, main, summary: dict, baseline, baseline_summary) -> None:
    import dataclasses
    import json

    from shunter.bench.serve_metrics import p50_ratios

    def records(result):
        return [{**dataclasses.asdict(r), "tpot": r.tpot} for r in result.records]

    report = {
        "url": args.url, "model": main.model, "endpoint": main.endpoint, "max_concurrency": args.max_concurrency,
        "timeout_s": args.timeout, "workload": dataclasses.asdict(workload), "clipping": dataclasses.asdict(clipping),
        "summary": summary,
        "baseline": None if baseline is None else {"summary": baseline_summary, "records": records(baseline)},
        "p50_ratios_to_baseline": None if baseline is None else p50_ratios(summary, baseline_summary),
        "records": records(main),
    }
    with open(path, "w") as f:
        # inf (an --rate inf run) is not JSON; write it as a string.
        json.dump(_finite(report), f, indent=1)
        f.write("\n")


def _finite(value):
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def plot_cdfs(path: str, records, baseline_records=None) -> None:
    """TTFT and TPOT CDFs (ms) of the successful requests, the baseline's dashed, to an image file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = [("under load", records, "-")]
    if baseline_records is not None:
        runs.append(("unloaded baseline", baseline_records, "--"))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for label, run, style in runs:
            values = [getattr(r, metric) for r in run if r.is_success and getattr(r, metric) is not None]
            if values:
                x = np.sort(np.asarray(values)) * 1000.0
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), style, label=f"{label} ({len(x)})")
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("shunter bench serve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
