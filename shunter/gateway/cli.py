"""`shunter serve --backend URL ...`: the gateway mode of `shunter serve` (flags and start-up)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from shunter.errors import CLIError

# Flags of `shunter serve` for Shunter's own instances: in a gateway only with --instances N (a mixed server).
_OWN_INSTANCES = {
    "model": "--model (the backends load their own models)",
    "served_model_name": "--served-model-name (the backends' /v1/models name the models)",
    "null_engine": "--null-engine",
    "ray_address": "--ray-address",
}
# Flags that make no sense beside remote servers, and why.
_NOT_WITH_BACKENDS = {
    "pd": "--pd (prefill/decode disaggregation moves KV caches, which remote backends cannot do)",
    "autoscale": "--autoscale (the scaling policy would count backends that Shunter can neither start nor stop)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "gateway mode",
        "Put Shunter's global scheduler in front of running OpenAI servers (vLLM, SGLang): each backend is an "
        "instance whose requests are proxied to it and whose load is scraped from its /metrics every control "
        "interval. Dispatch policies work as with local instances; live migration is NOT available for remote "
        "backends (a drained backend gets no new requests and stops once its requests end). With --instances N "
        "as well, the server also runs N instances of its own (--model, --runtime, ...): one OpenAI endpoint, "
        "and one dispatch policy picks among both kinds for the own model (backends must serve it under the "
        "same name); live migration stays among the own instances.")
    g.add_argument("--backend", action="append", default=None, metavar="URL",
                   help="an OpenAI server to dispatch to (repeat for more), e.g. http://127.0.0.1:8001")
    g.add_argument("--backends", default=None, metavar="FILE",
                   help="a file listing backends, one per line: URL [model=NAME[,NAME]] [gpu=KIND]")
    g.add_argument("--allow-missing-backends", action="store_true",
                   help="start without backends that do not answer at start-up (warned), as long as one does")
    g.add_argument("--backend-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a backend silent this long (before its answer or between stream chunks) ends the request "
                        "with 504 or an error event (default 600)")


def is_gateway(args) -> bool:
    """Backends are given: a gateway, or with --instances a mixed server."""
    return bool(args.backend or args.backends)


def read_specs(args) -> list:
    """The backends of `--backend` / `--backends`; CLIError naming a flag that cannot go with them."""
    from shunter.gateway.backends import read_backends

    for name, what in _NOT_WITH_BACKENDS.items():
        if getattr(args, name):
            raise CLIError(f"{what} does not apply beside remote backends (--backend/--backends)")
    if not args.backend_timeout > 0:
        raise CLIError(f"--backend-timeout must be positive, got {args.backend_timeout}")
    return read_backends(args.backend, args.backends)


def run(args) -> int:
    """`shunter serve` with backends: probe them, then serve until interrupted."""
    from shunter.cluster.bundles import BUNDLES, build_policy
    from shunter.cluster.dispatch import DISPATCH
    from shunter.gateway.gateway import BackendProbeError
    from shunter.gateway.server import GatewayServer, GatewaySettings
    from shunter.server.timeouts import ConnectionTimeouts
    from shunter.server.security import AccessPolicy

    for name, what in _OWN_INSTANCES.items():
        if getattr(args, name):
            raise CLIError(f"{what} does not apply to remote backends (--backend/--backends); "
                           f"add --instances N to run instances of Shunter's own beside them")
    if args.migration not in (None, "none"):
        raise CLIError("live migration is not available for remote backends: use --migration none or leave it "
                       "out (with --instances N it moves requests among Shunter's own instances)")
    if args.policy not in BUNDLES.names():
        raise CLIError(f"unknown policy bundle {args.policy!r}: use one of {', '.join(BUNDLES.names())}")
    if args.dispatch is not None and args.dispatch not in DISPATCH.names():
        raise CLIError(f"unknown dispatch policy {args.dispatch!r}: use one of {', '.join(DISPATCH.names())}")
    specs = read_specs(args)
    policy = build_policy(args.policy, dispatch=args.dispatch, migration="none")
    access = AccessPolicy(api_key=args.api_key or None, admin_key=args.admin_key or None,
                          admin_remote=args.admin_remote, max_body_bytes=args.max_request_bytes)
    settings = GatewaySettings(host=args.host, port=args.port, log_level=args.log_level, seed=args.seed,
                               control_interval=args.control_interval, backend_timeout=args.backend_timeout,
                               allow_missing=args.allow_missing_backends, access=access,
                               max_live_requests=args.max_live_requests, shutdown_timeout=args.shutdown_timeout,
                               timeouts=ConnectionTimeouts(keep_alive=args.timeout_keep_alive,
                                                           request_header=args.timeout_request_header,
                                                           request_body=args.timeout_request_body))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    server = GatewayServer(settings, specs, policy)

    def ready(srv: GatewayServer) -> None:
        gw = srv.gateway
        for warning in gw.warnings:
            print(f"shunter: warning: {warning}", file=sys.stderr)
        print(f"shunter: gateway on {srv.url} for {len(gw.backends)} backend(s) serving {', '.join(gw.models)} "
              f"(dispatch {policy.dispatch}; no live migration for remote backends); "
              f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

    try:
        _event_loop_runner()(server.serve(on_ready=ready))
    except BackendProbeError as exc:
        raise CLIError(str(exc)) from None
    return 0


def _event_loop_runner():
    """uvloop's `run` when it is installed (uvicorn[standard] brings it): a proxy is all event-loop work, and
    uvloop's loop costs far less per request than asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
