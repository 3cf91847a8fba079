"""The gateway's core: remote backends, one global scheduler per model, health and load from scrapes.

Each model has its own `GlobalScheduler` (the same object and registered
dispatch policies as serving and the simulator) over the backends that serve
it; a backend serving several models is in each of their schedulers. Every
control interval a watcher per backend scrapes its `/metrics` (or, without
metrics, asks `/v1/models`): a good answer is its new `LoadReport` (and puts a
failed backend back into dispatch); a refused connection, or
`HEALTH_FAILURES` bad answers in a row, take it out of dispatch and cut its
calls in flight short. Between scrapes each scheduler adds what it dispatched
itself to the last report, as for local instances.

In a mixed server (Shunter's own instances beside the backends, see
`shunter.server.runner`) the own instances' scheduler is handed in as
`shared`: a backend serving the own instances' model names joins that one
scheduler, so one dispatch policy picks among both kinds. Backends are
always admitted as fixed instances (`movable=False`): no request migrates
to or from them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import aiohttp

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.global_scheduler import GlobalScheduler
from shunter.gateway.backends import BackendSpec
from shunter.gateway.metrics import GatewayMetrics
from shunter.gateway.remote import Call, RemoteBackend
from shunter.gateway.scrape import Scraped, load_report, parse_metrics
from shunter.request import Request
from shunter.runtime.handles import InstanceState, NoInstanceError

log = logging.getLogger(__name__)

HEALTH_FAILURES = 3  # bad health answers in a row (not refused connections: those count at once) that fail a backend
CHECK_TIMEOUT_S = 5.0  # a scrape or probe that takes longer is a bad answer
CONNECT_TIMEOUT_S = 5.0


class UnknownModelError(LookupError):
    """No backend serves this model."""


class NoBackendError(NoInstanceError):
    """Backends serve the model, but none takes requests now (failed or draining)."""


class BackendProbeError(RuntimeError):
    """A backend did not answer, or not as an OpenAI server, at start-up."""


class Gateway:
    """Owns the backends, their schedulers and watchers, and the pooled HTTP client."""

    def __init__(self, specs: list[BackendSpec], policy: PolicyConfig, seed: int = 0, control_interval: float = 0.05,
                 backend_timeout: float = 600.0, allow_missing: bool = False, metrics: GatewayMetrics | None = None,
                 shared: GlobalScheduler | None = None, shared_models: tuple[str, ...] = (),
                 id_prefix: str = "") -> None:
        """`shared`, `shared_models`: a mixed server's own instances' scheduler and the model names they serve;
        `id_prefix` keeps the backends' ids apart from the own instances' ("b0", "b1", ...)."""
        self.specs = specs
        self.policy = policy
        self.seed = seed
        self.control_interval = control_interval
        self.backend_timeout = backend_timeout
        self.allow_missing = allow_missing
        self.backends: dict[str, RemoteBackend] = {}
        self.shared_models = shared_models
        self.schedulers: dict[str, GlobalScheduler] = {model: shared for model in shared_models}
        self.metrics = metrics or GatewayMetrics()
        self.id_prefix = id_prefix
        self._request_ids = itertools.count(1)
        self.session: aiohttp.ClientSession | None = None
        self.request_timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                                     sock_read=backend_timeout)
        self.warnings: list[str] = []
        self._watchers: dict[str, asyncio.Task] = {}
        self._num_calls = 0

    # ---- start and stop -------------------------------------------------------------------------
    async def start(self) -> None:
        """Probe every backend (side by side) and start watching those that answered.

        BackendProbeError naming each backend that does not answer as an OpenAI
        server, unless `allow_missing` (then they are left out with a warning,
        as long as one answers).
        """
        # One pooled client for every backend: keep-alive connections, no per-request set-up.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                                             auto_decompress=False)
        results = await asyncio.gather(*(self._probe(spec) for spec in self.specs), return_exceptions=True)
        problems = [str(r) for r in results if isinstance(r, BackendProbeError)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, BackendProbeError):
                raise r
        if problems and (not self.allow_missing or len(problems) == len(self.specs)):
            await self.session.close()
            hint = "" if self.allow_missing else " (--allow-missing-backends starts without them)"
            raise BackendProbeError("; ".join(problems) + hint)
        self.warnings = [f"left out: {p}" for p in problems] + self.warnings  # then the probes' own
        for spec, result in zip(self.specs, results):
            if isinstance(result, BaseException):
                continue
            models, scraped = result
            backend = RemoteBackend(f"{self.id_prefix}{len(self.backends)}", spec, models,
                                    has_metrics=scraped is not False)
            self.backends[backend.instance_id] = backend
            self._passed(backend, scraped or None, time.monotonic())
            self._watchers[backend.instance_id] = asyncio.create_task(self._watch(backend),
                                                                      name=f"watch-{backend.instance_id}")

    async def _probe(self, spec: BackendSpec) -> tuple[tuple[str, ...], Scraped | None | bool]:
        """(models it serves, its first scrape: a Scraped, None for metrics in no known format, False for none)."""
        try:
            async with self.session.get(spec.url + "/v1/models", timeout=_check_timeout()) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            if isinstance(exc, ValueError):
                raise BackendProbeError(f"backend {spec.url} is not an OpenAI server: GET /v1/models "
                                        f"did not answer JSON") from None
            raise BackendProbeError(f"backend {spec.url} does not answer: {_reason(exc)}") from None
        listed = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] \
            if isinstance(body, dict) and isinstance(body.get("data"), list) else None
        if status != 200 or not listed:
            what = f"answered {status}" if status != 200 else "did not list any model"
            raise BackendProbeError(f"backend {spec.url} is not an OpenAI server: GET /v1/models {what}")
        missing = [m for m in spec.models if m not in listed]
        if missing:
            raise BackendProbeError(f"backend {spec.url} does not serve {', '.join(missing)} "
                                    f"(it lists {', '.join(map(str, listed))})")
        models = spec.models or tuple(listed)
        shared = [m for m in self.shared_models if m in models]
        if shared and len(shared) < len(self.shared_models):
            # One scheduler dispatches every name of the own instances: a backend in it must take them all.
            raise BackendProbeError(f"backend {spec.url} serves {', '.join(shared)} but not "
                                    f"{', '.join(m for m in self.shared_models if m not in models)}, which this "
                                    f"server's own instances also serve: it must serve all of those names or none")
        try:
            scraped = await self._scrape(spec.url)
        except _CheckFailed:
            scraped = False
            self.warnings.append(f"backend {spec.url} has no /metrics: its load is what the gateway sent it")
        return models, scraped

    async def shutdown(self) -> None:
        for task in self._watchers.values():
            task.cancel()
        for backend in self.backends.values():
            backend.cut_calls("the gateway is shutting down")
        if self.session is not None:
            await self.session.close()

    # ---- models and dispatch ----------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        """Every model some backend serves (the union, in the order backends were listed)."""
        return list(self.schedulers)

    @property
    def ready_backends(self) -> list[RemoteBackend]:
        return [b for b in self.backends.values() if b.is_dispatchable]

    def dispatch(self, model: str, request: Request) -> RemoteBackend:
        """The backend the model's dispatch policy picks, with the request counted in its view.

        UnknownModelError if no backend serves `model`; NoBackendError if none
        of those takes requests now.
        """
        scheduler = self.schedulers.get(model)
        if scheduler is None:
            raise UnknownModelError(model)
        try:
            backend = scheduler.select_instance(request, request.arrival_time)
        except ValueError as exc:
            raise NoBackendError(f"no backend serving {model} takes requests now ({exc})") from None
        scheduler.assign(request, backend)
        self.metrics.dispatches.labels(self.policy.dispatch, backend.instance_id).inc()
        return backend

    def begin(self, backend: RemoteBackend, request: Request) -> Call:
        """Register a request in flight on `backend` (until `end`)."""
        call = Call(request, time.monotonic())
        backend.track(call)
        self._num_calls += 1
        return call

    def prefilled(self, backend: RemoteBackend, call: Call) -> None:
        """The call's first chunk came back: its prompt no longer counts as queued prefill on `backend`."""
        if call.first_at is None:
            call.first_at = time.monotonic()
            for scheduler in self.schedulers_of(backend):
                scheduler.count_prefilled(call.request, backend.instance_id)

    def end(self, backend: RemoteBackend, call: Call) -> None:
        """The request is over on `backend`; a drained backend with nothing left in flight stops."""
        if call.request.request_id in backend.calls:
            self.prefilled(backend, call)  # a whole answer, or one cut short: no prefill left either way
            backend.untrack(call)
            self._num_calls -= 1
        if backend.state is InstanceState.DRAINING and not backend.calls:
            self._stop(backend)

    @property
    def num_live_requests(self) -> int:
        return self._num_calls

    def next_request_id(self) -> str:
        return f"gw-{next(self._request_ids)}"

    def find_call(self, request_id: str) -> tuple[RemoteBackend, Call] | None:
        """The backend a request is in flight on, and its call (None if none has it)."""
        for backend in self.backends.values():
            call = backend.calls.get(request_id)
            if call is not None:
                return backend, call
        return None

    # ---- health ---------------------------------------------------------------------------------
    def fail(self, backend: RemoteBackend, reason: str) -> None:
        """Take `backend` out of dispatch; its calls in flight are cut short. It returns once a check passes."""
        if backend.state in (InstanceState.FAILED, InstanceState.STOPPED):
            return
        was_draining = backend.state is InstanceState.DRAINING
        log.warning("backend %s (%s) failed: %s", backend.instance_id, backend.url, reason)
        backend.state = InstanceState.FAILED
        backend.error = reason
        self._leave_dispatch(backend)
        backend.cut_calls(f"backend {backend.instance_id} ({backend.url}) failed: {reason}")
        if was_draining:
            self._stop(backend)  # it was leaving anyway: nothing to come back to
        self._update_state_gauge()

    def drain(self, instance_id: str) -> RemoteBackend:
        """Dispatch nothing more to the backend; once its requests in flight end, it is stopped (not migrated:
        remote backends cannot move requests). KeyError for an unknown id."""
        backend = self.backends[instance_id]
        if backend.state is InstanceState.READY:
            for scheduler in self.schedulers_of(backend):
                scheduler.drain(instance_id)
            backend.state = InstanceState.DRAINING
            if not backend.calls:
                self._stop(backend)
            self._update_state_gauge()
        return backend

    def _stop(self, backend: RemoteBackend) -> None:
        self._leave_dispatch(backend)
        backend.state = InstanceState.STOPPED
        watcher = self._watchers.pop(backend.instance_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        self._update_state_gauge()

    async def _watch(self, backend: RemoteBackend) -> None:
        """Every control interval: scrape (or probe) the backend, and act on the answer."""
        while backend.state is not InstanceState.STOPPED:
            started = time.monotonic()
            try:
                scraped = await (self._scrape(backend.url) if backend.has_metrics else self._ping(backend.url))
            except _CheckFailed as exc:
                backend.num_failed_checks += 1
                if exc.refused or backend.num_failed_checks >= HEALTH_FAILURES:
                    self.fail(backend, exc.reason)
            except Exception:  # a bug here must not end the watch: it is logged and retried next interval
                log.exception("checking backend %s failed", backend.instance_id)
            else:
                self._passed(backend, scraped, started)
            await asyncio.sleep(max(0.0, self.control_interval - (time.monotonic() - started)))

    async def _scrape(self, url: str) -> Scraped | None:
        text = await self._get(url + "/metrics")
        return parse_metrics(text)

    async def _ping(self, url: str) -> None:
        await self._get(url + "/v1/models")
        return None

    async def _get(self, url: str) -> str:
        try:
            async with self.session.get(url, timeout=_check_timeout()) as resp:
                if resp.status != 200:
                    raise _CheckFailed(f"GET {url} answered {resp.status}")
                return await resp.text()
        except aiohttp.ClientConnectorError as exc:
            raise _CheckFailed(f"GET {url}: {_reason(exc)}", refused=True) from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _CheckFailed(f"GET {url}: {_reason(exc)}") from None

    def _passed(self, backend: RemoteBackend, scraped: Scraped | None, started: float) -> None:
        """A good check: the backend's new report; a failed backend comes back into dispatch."""
        backend.num_failed_checks = 0
        backend.scraped = scraped
        now = time.monotonic()
        # Queued prefill: the gateway's own calls there with nothing back yet (sent before the scrape began:
        # the later ones are counted again below, as dispatch did).
        report = load_report(backend.instance_id, scraped, now, backend.in_flight_prompt_tokens(),
                             backend.unprefilled_prompt_tokens(started))
        backend.last_report = report
        if backend.state in (InstanceState.STARTING, InstanceState.FAILED):
            if backend.state is InstanceState.FAILED:
                log.warning("backend %s (%s) is healthy again", backend.instance_id, backend.url)
            backend.state = InstanceState.READY
            backend.error = None
            for model in backend.models:
                if model not in self.schedulers:
                    self.schedulers[model] = GlobalScheduler(policy=self.policy, seed=self.seed)
            for scheduler in _distinct(self.schedulers[model] for model in backend.models):
                scheduler.add_instance(backend, report, movable=False)
            self._update_state_gauge()
        elif backend.state is InstanceState.STOPPED:
            return
        else:
            # Requests sent after the scrape began may not be in it yet: count them again, as dispatch did.
            recent = [c for c in backend.calls.values() if c.sent_at >= started]
            for scheduler in self.schedulers_of(backend):
                scheduler.update_reports([report])
                for call in recent:
                    scheduler.count_incoming(call.request, backend.instance_id)
                    if call.first_at is not None:
                        scheduler.count_prefilled(call.request, backend.instance_id)
        self.metrics.observe_backend(backend, report)

    def schedulers_of(self, backend: RemoteBackend) -> list[GlobalScheduler]:
        """The schedulers dispatching to `backend` (one per model it serves, a shared one once)."""
        return _distinct(s for s in self.schedulers.values() if backend.instance_id in s.views)

    def _leave_dispatch(self, backend: RemoteBackend) -> None:
        for scheduler in self.schedulers_of(backend):
            scheduler.remove_instance(backend.instance_id)
        self.metrics.forget_backend(backend)

    def _update_state_gauge(self) -> None:
        self.metrics.count_instances("remote", (b.state for b in self.backends.values()))


def _distinct(schedulers) -> list[GlobalScheduler]:
    return list({id(s): s for s in schedulers}.values())


class _CheckFailed(Exception):
    def __init__(self, reason: str, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused


def _check_timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)


def _reason(exc: BaseException) -> str:
    """A short reason for a client error (aiohttp's own text, or the kind of timeout)."""
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}"
