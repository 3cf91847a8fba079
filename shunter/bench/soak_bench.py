"""`shunter bench soak`: a bounded run with every fault at once; at the end nothing may be leaked or wrong.

    shunter bench soak [--minutes 2] [--instances 3] [--rate 20] [--runtime ray|local] [--json PATH]

A server with null-engine instances (each token after `--step-time`; Ray
actors by default, each its own process) and `--restart-failed` takes random
arrivals (Poisson, `--rate` per second) of completions, streamed or not, of
random lengths. Meanwhile some clients hang up mid-request (`--abort-fraction`),
live requests are migrated to random instances through the admin API every
`--migrate-interval` seconds, the migration policy moves others, and once, at
`--kill-at` of the run, one instance is killed (its Ray actor, or its engine
loop in process) and a replacement starts.

At the end it waits for every request to end and checks: every completed
output is exactly the null engine's text for its length (a lost, repeated or
reordered token shows), no request hung (`--request-timeout`), no KV block or
request is left on any live instance, nothing is left in the frontend, and the
memory of every process (RSS at start and end) stayed flat. It prints requests,
completions, aborts, migrations, resumes, errors by kind and leaked blocks, and
exits 1 if any check failed. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from shunter.errors import CLIError
from shunter.sim.cli import HelpFormatter

MAX_MINUTES = 10.0
RSS_GROWTH_LIMIT = 0.25  # more than this fraction of growth in a process's RSS fails "memory flat"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("soak", help="random load with aborts, migrations and a killed instance; "
                                                 "checks nothing leaks", description=__doc__.splitlines()[0],
                                    formatter_class=HelpFormatter)
    p.add_argument("--minutes", type=float, default=2.0, help=f"length of the load (at most {MAX_MINUTES:g})")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=120, help="output tokens per request at most (uniform from 4)")
    p.add_argument("--step-time", type=float, default=0.01, help="seconds each null engine step takes")
    p.add_argument("--abort-fraction", type=float, default=0.1, help="share of clients that hang up mid-request")
    p.add_argument("--stream-fraction", type=float, default=0.7, help="share of streamed requests")
    p.add_argument("--migrate-interval", type=float, default=0.5, help="seconds between forced migrations")
    p.add_argument("--kill-at", type=float, default=0.4, help="when to kill an instance, as a fraction of the run")
    p.add_argument("--request-timeout", type=float, default=60.0, help="a request taking longer counts as hung")
    p.add_argument("--policy", default="llumnix", help="policy bundle of the server (its migration policy runs too)")
    p.add_argument("--runtime", default="ray", choices=["ray", "local"],
                   help="instances as Ray actors (own processes) or as threads of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the report here")
    p.set_defaults(func=run_bench)


@dataclass
class SoakReport:
    requests: int = 0
    completed: int = 0
    client_aborts: int = 0
    errors: Counter = field(default_factory=Counter)  # kind -> count
    malformed: int = 0
    hung: int = 0
    migrations: Counter = field(default_factory=Counter)  # outcome (or refusal) -> count
    resumes: int = 0
    instance_failures: int = 0
    restarts: int = 0
    killed: str | None = None
    leaked_blocks: int = 0
    leftover_requests: int = 0
    rss_mb: dict = field(default_factory=dict)  # process -> {"start": MB, "end": MB}
    minutes: float = 0.0

    @property
    def memory_flat(self) -> bool:
        return all(v["end"] <= v["start"] * (1 + RSS_GROWTH_LIMIT) for v in self.rss_mb.values()
                   if v.get("start") and v.get("end"))

    @property
    def ok(self) -> bool:
        return (self.malformed == 0 and self.hung == 0 and self.leaked_blocks == 0 and self.leftover_requests == 0
                and not any(k.startswith("5") for k in self.errors) and self.memory_flat)

    def to_json(self) -> dict:
        return {"requests": self.requests, "completed": self.completed, "client_aborts": self.client_aborts,
                "errors": dict(self.errors), "malformed": self.malformed, "hung": self.hung,
                "migrations": dict(self.migrations), "resumes": self.resumes,
                "instance_failures": self.instance_failures, "restarts": self.restarts, "killed": self.killed,
                "leaked_blocks": self.leaked_blocks, "leftover_requests": self.leftover_requests,
                "rss_mb": self.rss_mb, "memory_flat": self.memory_flat, "minutes": self.minutes, "ok": self.ok}


def run_bench(args: argparse.Namespace) -> int:
    if not 0 < args.minutes <= MAX_MINUTES:
        raise CLIError(f"--minutes must be in (0, {MAX_MINUTES:g}], got {args.minutes}")
    for name in ("instances", "max_tokens"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.instances < 2:
        raise CLIError(f"--instances must be at least 2 (one is killed), got {args.instances}")
    for name in ("rate", "migrate_interval", "request_timeout"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("abort_fraction", "stream_fraction", "kill_at"):
        if not 0 <= getattr(args, name) <= 1:
            raise CLIError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    if args.step_time < 0:
        raise CLIError(f"--step-time must be >= 0, got {args.step_time}")
    report = soak(args)
    print_report(report)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0 if report.ok else 1


def soak(args: argparse.Namespace) -> SoakReport:
    """Start the server, run the load with its faults, check the end state; the report."""
    from shunter.cluster.bundles import build_policy
    from shunter.model.loader import load_tokenizer_and_context, prepare_checkpoint
    from shunter.runtime.spec import InstanceSpec
    from shunter.server.cli import NULL_ENGINE_TEXT, start_ray
    from shunter.server.runner import Server, ServerSettings, local_handles, ray_handles

    tokenizer, _ = load_tokenizer_and_context(prepare_checkpoint(None))
    null_ids = tokenizer.encode(NULL_ENGINE_TEXT, add_special_tokens=False)
    spec = InstanceSpec(executor="null", max_model_len=1024, null_token_ids=null_ids,
                        null_step_time=args.step_time, num_blocks=512, report_interval=0.05)
    settings = ServerSettings(port=0, num_instances=args.instances, served_model_names=("soak",),
                              restart_failed=True, max_live_requests=4096, seed=args.seed)
    if args.runtime == "ray":
        start_ray(None)
    server = Server(settings, spec, build_policy(args.policy), tokenizer, 1024,
                    ray_handles if args.runtime == "ray" else local_handles)
    server.start_in_thread(timeout=120)
    try:
        expected = lambda n: tokenizer.decode([null_ids[k % len(null_ids)] for k in range(n)])  # noqa: E731
        return asyncio.run(_soak(server, args, expected))
    finally:
        server.stop()
        if args.runtime == "ray":
            import ray

            ray.shutdown()


async def _soak(server, args: argparse.Namespace, expected) -> SoakReport:
    import aiohttp

    report = SoakReport()
    rng = random.Random(args.seed)
    frontend = server.frontend
    duration = args.minutes * 60
    rss_start = _rss_by_process(frontend)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(server.url, timeout=timeout) as http:
        tasks: list[asyncio.Task] = []
        side = [asyncio.create_task(_migrator(http, args, rng, report, started + duration)),
                asyncio.create_task(_killer(server, args, rng, report, started + args.kill_at * duration))]
        while time.monotonic() - started < duration:
            await asyncio.sleep(rng.expovariate(args.rate))
            tasks.append(asyncio.create_task(_one_request(http, args, rng, report, expected)))
            report.requests += 1
        await asyncio.gather(*tasks)
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
    report.minutes = (time.monotonic() - started) / 60
    await _check_end_state(server, report)
    rss_end = _rss_by_process(frontend)
    report.rss_mb = {name: {"start": rss_start.get(name), "end": rss_end.get(name)}
                     for name in sorted(set(rss_start) | set(rss_end))}
    metrics = frontend.metrics
    report.resumes = int(metrics.resumes._value.get())
    report.instance_failures = int(metrics.instance_failures._value.get())
    report.restarts = int(metrics.restarts._value.get())
    return report


async def _one_request(http, args, rng: random.Random, report: SoakReport, expected) -> None:
    import aiohttp

    max_tokens = rng.randint(4, args.max_tokens)
    stream = rng.random() < args.stream_fraction
    body = {"model": "soak", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))),
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    abort_after = rng.uniform(0.0, max_tokens * args.step_time) if rng.random() < args.abort_fraction else None
    call = _call(http, body, stream)
    try:
        if abort_after is not None:
            try:
                await asyncio.wait_for(call, abort_after)
            except asyncio.TimeoutError:
                report.client_aborts += 1  # the connection is closed mid-request: the server must abort it
                return
            text, usage, error = None, None, None  # it finished before the client hung up
        else:
            text, usage, error = await call
    except asyncio.TimeoutError:
        report.hung += 1
        return
    except aiohttp.ClientError as exc:
        report.errors[f"client:{type(exc).__name__}"] += 1
        return
    if error is not None:
        report.errors[error] += 1
        return
    if text is None:
        report.completed += 1
        return
    report.completed += 1
    if text != expected(max_tokens) or usage is None or usage.get("completion_tokens") != max_tokens:
        report.malformed += 1


async def _call(http, body: dict, stream: bool) -> tuple[str | None, dict | None, str | None]:
    """(text, usage, None) for a completed request, or (None, None, error kind)."""
    async with http.post("/v1/completions", json=body) as resp:
        if resp.status != 200:
            return None, None, str(resp.status)
        if not stream:
            out = await resp.json()
            return out["choices"][0]["text"], out.get("usage"), None
        pieces, usage = [], None
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None, None, "stream-error"
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                pieces.append(choice.get("text") or "")
        return "".join(pieces), usage, None


async def _migrator(http, args, rng: random.Random, report: SoakReport, until: float) -> None:
    """Every interval: move one random live request to a random other ready instance, through the admin API."""
    while time.monotonic() < until:
        await asyncio.sleep(args.migrate_interval)
        async with http.get("/admin/requests") as resp:
            live = [r for r in (await resp.json())["requests"] if not r["migrating"]]
        async with http.get("/admin/instances") as resp:
            ready = [i["id"] for i in (await resp.json())["instances"] if i["state"] == "ready"]
        if not live:
            continue
        pick = rng.choice(live)
        targets = [i for i in ready if i != pick["instance"]]
        if not targets:
            continue
        asyncio.create_task(_migrate(http, pick["id"], rng.choice(targets), report))


async def _migrate(http, request_id: str, to: str, report: SoakReport) -> None:
    async with http.post(f"/admin/requests/{request_id}/migrate", json={"to": to}) as resp:
        if resp.status == 200:
            report.migrations[(await resp.json())["outcome"]] += 1
        else:
            report.migrations[f"refused-{resp.status}"] += 1


async def _killer(server, args, rng: random.Random, report: SoakReport, at: float) -> None:
    """Once: kill a random ready instance (its Ray actor, or its engine loop in process)."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    ready = list(server.frontend.ready_instances)
    if len(ready) < 2:
        return
    victim = rng.choice(ready)
    report.killed = victim.instance_id
    if getattr(victim, "actor", None) is not None:
        import ray

        ray.kill(victim.actor)
    else:
        await asyncio.to_thread(victim.loop.stop)


async def _check_end_state(server, report: SoakReport, timeout: float = 10.0) -> None:
    """Wait for the frontend to empty, then count what is left on every live instance."""
    frontend = server.frontend
    deadline = time.monotonic() + timeout
    while frontend.num_live_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    report.leftover_requests = frontend.num_live_requests()
    while True:  # aborts and finishes reach an instance between two of its steps: give them a moment
        leaked, left = 0, 0
        for handle in list(frontend.handles.values()):
            if handle.state.value not in ("ready", "draining"):
                continue
            load = await asyncio.to_thread(handle.engine_call, "load_report", time.monotonic())
            leaked += load.num_used_blocks
            left += load.num_running + load.num_waiting + load.num_preempted + load.num_incoming
        if (leaked == 0 and left == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    report.leaked_blocks = leaked
    report.leftover_requests += left


def _rss_by_process(frontend) -> dict[str, float]:
    """RSS in MB of the frontend's process and of each live instance's process (Linux /proc)."""
    pids = {"frontend": os.getpid()}
    for handle in frontend.handles.values():
        pid = handle.facts.get("pid")
        if pid is not None and pid != os.getpid() and handle.state.value in ("ready", "draining"):
            pids[f"instance {handle.instance_id}"] = pid
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/status") as f:
                rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        out[name] = round(rss_kb / 1024, 1)
    return out


def print_report(r: SoakReport) -> None:
    print(f"soak: {r.minutes:.1f} min, {r.requests} requests: {r.completed} completed, {r.client_aborts} "
          f"aborted by their client, {r.hung} hung, {r.malformed} malformed")
    print(f"  errors by kind: {dict(r.errors) or 'none'}")
    print(f"  migrations: {dict(r.migrations) or 'none'}; instance killed: {r.killed}; failures seen "
          f"{r.instance_failures}, requests resumed {r.resumes}, instances restarted {r.restarts}")
    print(f"  left at the end: {r.leaked_blocks} KV blocks, {r.leftover_requests} requests")
    for name, v in r.rss_mb.items():
        print(f"  RSS {name}: {v['start']} MB at start, {v['end']} MB at the end")
    print(f"  memory flat (each process grew < {RSS_GROWTH_LIMIT:.0%}): {'yes' if r.memory_flat else 'NO'}")
    print(f"soak {'passed' if r.ok else 'FAILED'}")
