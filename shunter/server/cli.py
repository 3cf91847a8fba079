"""`shunter serve`: an OpenAI-compatible server over several instances, each a Ray actor.

    shunter serve                                  # built-in SmolLM2, 2 instances, http://127.0.0.1:8000
    shunter serve --model /path/to/hf-dir --instances 4 --policy llumnix --port 8080
    shunter serve --ray-address auto               # join a running Ray cluster (instances on other machines)
    shunter serve --backend http://127.0.0.1:8001 --backend http://127.0.0.1:8002 --dispatch prefix
                                                   # gateway in front of running vLLM / SGLang servers
    shunter serve --instances 2 --backend http://127.0.0.1:8001
                                                   # 2 own instances and a vLLM server, one endpoint, one policy

Flags that `vllm serve` also has mean the same here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from shunter.errors import CLIError
from shunter.gateway import cli as gateway_cli
from shunter.runtime.spec import DEFAULT_MIGRATION_COPY_RATE, KV_CHANNELS


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI API on several instances (Ray actors)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model name(s) clients ask for (default: the model's directory or file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once per instance")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step per instance")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (default: sized for the device)")
    p.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false",
                   help="turn prefix caching off")
    p.add_argument("--instances", type=int, default=None,
                   help="instances to start (default 2; with --pd, P + D; with --backend/--backends none unless "
                        "given, and then they serve beside the backends)")
    p.add_argument("--pd", default=None, metavar="P:D",
                   help="prefill/decode disaggregation: P prefill and D decode instances (P + D instances in all); "
                        "each request prefills on a prefill instance and migrates to a decode instance after its "
                        "first token (not with --autoscale)")
    p.add_argument("--threads-per-instance", type=int, default=None,
                   help="torch threads per instance (default: this machine's cores / instances, at least 1)")
    p.add_argument("--policy", default="infaas",
                   help="policy bundle (dispatch + live-migration policy): rr, infaas, llumnix, shunter")
    p.add_argument("--dispatch", default=None, help="dispatch policy (overrides the bundle's; see shunter simulate --list)")
    p.add_argument("--migration", default=None,
                   help="migration pairing policy: none, llumnix, shunter (overrides the bundle's)")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="start and drain instances between MIN and MAX with the scaling policy (starts with "
                        "--instances, at least MIN); drained instances are stopped once their requests moved away "
                        "(not with --pd)")
    p.add_argument("--scaling-policy", default=None, metavar="NAME",
                   help="freeness or shunter (default: shunter with --policy shunter, else freeness)")
    p.add_argument("--control-interval", type=float, default=0.05,
                   help="seconds between migration decisions over the pushed load reports (default 0.05)")
    p.add_argument("--report-interval", type=float, default=0.05,
                   help="seconds between the load reports each instance pushes (default 0.05)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto or HOST:6379) instead of starting a local Ray")
    p.add_argument("--runtime", default="ray", choices=["ray", "local"],
                   help="ray: each instance a Ray actor (default); local: instances as threads of this process")
    p.add_argument("--kv-channel", default="shared-memory", metavar="{" + ",".join(KV_CHANNELS) + "}",
                   help="how live migration moves KV between instances: shared-memory lets the destination "
                        "read the source's cache directly when both are on this machine with CPU caches (the "
                        "source spends nothing on the copy; elsewhere Ray's object store is used); "
                        "object-store always goes through Ray; torch-distributed sends the blocks from the "
                        "source's process to the destination's over a gloo link (TCP), on one machine or across "
                        "machines (default shared-memory)")
    p.add_argument("--migration-copy-rate", type=float, default=DEFAULT_MIGRATION_COPY_RATE / 1e9, metavar="GB_PER_S",
                   help="over shared memory, a live migration's stages that run while the request still decodes "
                        "copy at most this many GB/s, so that the source's steps keep their memory bandwidth "
                        "(0: unpaced; the final stage is never paced; default %(default)g)")
    p.add_argument("--migration-stage-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a live migration whose stage (a KV copy or an instance call) takes longer is aborted: "
                        "the request goes on where it was (default 10)")
    p.add_argument("--instance-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="an instance that sends nothing (no step, no load report) for this long counts as failed: "
                        "it is stopped and its requests resume elsewhere (default 60; above the longest step)")
    p.add_argument("--restart-failed", action="store_true",
                   help="start a new instance in place of each one that dies (its requests resume elsewhere "
                        "either way: re-prefilled on a healthy instance, the stream going on)")
    p.add_argument("--api-key", default=os.environ.get("SHUNTER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SHUNTER_API_KEY; /health and "
                        "/metrics stay open)")
    p.add_argument("--admin-key", default=os.environ.get("SHUNTER_ADMIN_KEY"),
                   help="require this key on /admin (default: $SHUNTER_ADMIN_KEY)")
    p.add_argument("--admin-remote", action="store_true",
                   help="answer /admin from other machines too (default: loopback clients only)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--max-live-requests", type=int, default=1024,
                   help="requests in flight at most; beyond, new ones get 429 with Retry-After")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="close a connection idle this many seconds between requests or after opening (default 5)")
    p.add_argument("--timeout-request-header", type=float, default=10.0,
                   help="a request's headers must arrive within this many seconds of the connection opening or "
                        "the previous response; else 408 and the connection is closed (default 10)")
    p.add_argument("--timeout-request-body", type=float, default=30.0,
                   help="a request's body must arrive within this many seconds of its headers; else 408 and the "
                        "connection is closed (default 30)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: stop taking requests, give those in flight this many seconds, then exit")
    p.add_argument("--null-step-time", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--null-engine", action="store_true",
                   help="benchmarks only: instances load no model and emit tokens instantly "
                        "(measures the frontend and the token path on their own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    gateway_cli.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shunter.cluster.bundles import BUNDLES, build_policy
    from shunter.cluster.disaggregation import parse_pd
    from shunter.cluster.dispatch import DISPATCH
    from shunter.cluster.migration_policy import MIGRATION
    from shunter.runtime.spec import InstanceSpec

    _check_args(args)
    backends = gateway_cli.is_gateway(args)
    if backends and args.instances is None:
        return gateway_cli.run(args)
    if args.allow_missing_backends and not backends:
        raise CLIError("--allow-missing-backends needs --backend or --backends")
    if args.policy not in BUNDLES.names():
        raise CLIError(f"unknown policy bundle {args.policy!r}: use one of {', '.join(BUNDLES.names())}")
    if args.dispatch is not None and args.dispatch not in DISPATCH.names():
        raise CLIError(f"unknown dispatch policy {args.dispatch!r}: use one of {', '.join(DISPATCH.names())}")
    if args.migration is not None and args.migration not in MIGRATION.names():
        raise CLIError(f"unknown migration policy {args.migration!r}: use one of {', '.join(MIGRATION.names())}")
    # A mixed server: own instances and remote backends under one dispatch policy.
    specs = gateway_cli.read_specs(args) if backends else []
    scaling = parse_autoscale(args.autoscale, args.scaling_policy, args.policy)
    pd = parse_pd(args.pd, instances=args.instances, autoscale=args.autoscale)
    policy = build_policy(args.policy, dispatch=args.dispatch, migration=args.migration, scaling=scaling)
    if pd is not None:
        args.instances = pd.num_instances
    elif args.instances is None:
        args.instances = 2
    if scaling is not None:
        args.instances = min(max(args.instances, scaling.min_instances), scaling.max_instances)
    threads = args.threads_per_instance or max(1, (os.cpu_count() or 1) // args.instances)
    started = time.monotonic()
    from shunter.model.loader import load_tokenizer_and_context, prepare_checkpoint, source_path

    source = prepare_checkpoint(args.model)  # a GGUF file is converted once, before any instance loads it
    tokenizer, model_len = load_tokenizer_and_context(source)
    if args.max_model_len is not None and args.max_model_len > model_len:
        raise CLIError(f"--max-model-len {args.max_model_len} exceeds the model's context of {model_len} tokens")
    spec = InstanceSpec(
        model=source_path(source), dtype=args.dtype, device=args.device, num_threads=threads,
        block_size=args.block_size, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=args.prefix_caching, report_interval=args.report_interval, seed=args.seed,
        kv_channel=args.kv_channel, migration_copy_rate=args.migration_copy_rate * 1e9 or None,
    )
    if args.null_engine:
        spec = spec.replace(executor="null", model=None, null_step_time=args.null_step_time,
                            null_token_ids=tokenizer.encode(NULL_ENGINE_TEXT, add_special_tokens=False))
    names = tuple(args.served_model_name or [default_model_name(args.model)])
    from shunter.server.runner import Server, ServerSettings, local_handles, ray_handles

    if args.runtime == "ray":
        start_ray(args.ray_address)
    from shunter.server.security import AccessPolicy
    from shunter.server.timeouts import ConnectionTimeouts

    timeouts = ConnectionTimeouts(keep_alive=args.timeout_keep_alive, request_header=args.timeout_request_header,
                                  request_body=args.timeout_request_body)
    access = AccessPolicy(api_key=args.api_key or None, admin_key=args.admin_key or None,
                          admin_remote=args.admin_remote, max_body_bytes=args.max_request_bytes)
    settings = ServerSettings(host=args.host, port=args.port, num_instances=args.instances, pd=pd,
                              access=access, timeouts=timeouts, max_live_requests=args.max_live_requests,
                              shutdown_timeout=args.shutdown_timeout, restart_failed=args.restart_failed,
                              migration_stage_timeout=args.migration_stage_timeout,
                              instance_timeout=args.instance_timeout,
                              served_model_names=names, log_level=args.log_level, seed=args.seed,
                              control_interval=args.control_interval, backends=tuple(specs),
                              backend_timeout=args.backend_timeout,
                              allow_missing_backends=args.allow_missing_backends)
    server = Server(settings, spec, policy, tokenizer, model_len,
                    ray_handles if args.runtime == "ray" else local_handles)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(srv: Server) -> None:
        gw = srv.gateway
        for warning in gw.warnings if gw is not None else ():
            print(f"shunter: warning: {warning}", file=sys.stderr)
        beside = "" if gw is None else (
            f" and {len(gw.backends)} remote backend(s) ({', '.join(b.url for b in gw.backends.values())}; "
            f"models {', '.join(srv.state.model_names)}; migration among own instances only)")
        print(f"shunter: serving {names[0]} on {srv.url} with {args.instances} instance(s) "
              f"({args.runtime}, {threads} thread(s) each, dispatch {policy.dispatch}, migration {policy.migration}"
              f"{f', P/D {pd}' if pd else ''}){beside}; "
              f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

    from shunter.gateway.gateway import BackendProbeError

    try:
        asyncio.run(server.serve(on_ready=ready))
    except BackendProbeError as exc:
        raise CLIError(str(exc)) from None
    return 0


# What a null engine says, over and over (a real tokenization of it, so detokenizing costs what it does).
NULL_ENGINE_TEXT = " The quick brown fox jumps over the lazy dog."


def _check_args(args) -> None:
    for name in ("port", "instances", "max_num_seqs", "max_num_batched_tokens", "block_size"):
        value = getattr(args, name)
        if value is None:
            continue  # --instances: its default depends on --pd and --backend
        if value <= 0 or (name == "port" and value > 65535):
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer{' up to 65535' if name == 'port' else ''}, got {value}")
    for name in ("max_request_bytes", "max_live_requests"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("num_blocks", "max_model_len", "threads_per_instance"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("report_interval", "control_interval", "shutdown_timeout", "migration_stage_timeout", "instance_timeout",
                 "timeout_keep_alive", "timeout_request_header", "timeout_request_body"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.kv_channel not in KV_CHANNELS:
        raise CLIError(f"unknown --kv-channel {args.kv_channel!r}: use one of {', '.join(KV_CHANNELS)}")
    if not args.migration_copy_rate >= 0 or args.migration_copy_rate == float("inf"):
        raise CLIError(f"--migration-copy-rate must be a number of GB/s >= 0 (0: unpaced), got {args.migration_copy_rate}")


def parse_autoscale(text: str | None, policy_name: str | None, bundle: str):
    """The ScalingConfig of `--autoscale MIN:MAX` (None without it); CLIError naming a bad value."""
    from shunter.cluster.scaling import SCALING, ScalingConfig

    if text is None:
        if policy_name is not None:
            raise CLIError("--scaling-policy needs --autoscale MIN:MAX")
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise CLIError(f"--autoscale takes MIN:MAX, two whole numbers, got {text!r}")
    name = policy_name or ("shunter" if bundle == "shunter" else "freeness")
    if name not in SCALING.names():
        raise CLIError(f"unknown scaling policy {name!r}: use one of {', '.join(SCALING.names())}")
    try:
        return ScalingConfig(min_instances=int(parts[0]), max_instances=int(parts[1]), policy=name)
    except ValueError as exc:
        raise CLIError(f"--autoscale {text}: {exc}") from None


def default_model_name(model: str | None) -> str:
    """What clients call the model: the built-in's name, else the directory or file name."""
    if model is None:
        return "SmolLM2-135M-Instruct"
    base = os.path.basename(os.path.normpath(model))
    return base.removesuffix(".gguf") or model


def start_ray(address: str | None) -> None:
    """Join `address`, or start a local Ray (quietly: no dashboard, logs only on errors)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**kwargs)
    except ConnectionError as exc:
        raise CLIError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
