"""The admin listener: `/healthz`, `/livez` and `/metrics`, kept off the public ports.

It is off unless `--admin-port` is given and binds 127.0.0.1 by default, so a load balancer's
health check or a Prometheus scraper on the host reaches it and browsers do not.

- `/healthz` (also `/readyz`): 200 when the QAP socket accepts a connection and answers with an
  Rserve greeting within the probe timeout, 503 with the reason otherwise. Each probe costs
  Rserve one fork, which it ends as soon as we close.
- `/livez`: 200 while the process serves HTTP at all.
- `/metrics`: Prometheus text format, from the shared `Stats` (every worker's rows summed).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .qap import HEADER_SIZE, QAPError, classify_greeting
from .stats import Slot, Stat, Stats

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0

ADMIN: web.AppKey[Admin] = web.AppKey("admin")


def labelled(
    stats: Stats, name: str, text: str, label: str, members: Iterable[tuple[str, Stat]]
) -> CounterMetricFamily:
    """One counter family with a sample per (label value, Stat)."""
    family = CounterMetricFamily(name, text, labels=[label])
    for value, stat in members:
        family.add_metric([value], stats.total(stat))
    return family


class StatsCollector(Collector):
    def __init__(self, stats: Stats, workers: int = 1) -> None:
        self.stats = stats
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily(
            "forward_sessions_open",
            "WebSocket sessions relayed right now",
            value=s.total(Stat.SESSIONS_OPEN),
        )
        yield CounterMetricFamily(
            "forward_sessions",
            "WebSocket sessions relayed to Rserve since start",
            value=s.total(Stat.SESSIONS_TOTAL),
        )
        yield labelled(
            s,
            "forward_relay_bytes",
            "bytes relayed, by direction",
            "direction",
            (("to_r", Stat.BYTES_TO_R), ("from_r", Stat.BYTES_FROM_R)),
        )
        yield labelled(
            s,
            "forward_relay_messages",
            "QAP messages relayed, by direction",
            "direction",
            (("to_r", Stat.MESSAGES_TO_R), ("from_r", Stat.MESSAGES_FROM_R)),
        )
        yield CounterMetricFamily(
            "forward_backend_connect_failures",
            "sessions refused because the Rserve socket could not be reached",
            value=s.total(Stat.BACKEND_FAILURES),
        )
        yield CounterMetricFamily(
            "forward_tls_handshake_failures",
            "TLS handshakes that failed",
            value=s.total(Stat.TLS_HANDSHAKE_FAILURES),
        )
        yield CounterMetricFamily(
            "forward_malformed_requests",
            "HTTP requests the parser refused with 400 (one rate-limited log line each)",
            value=s.total(Stat.MALFORMED_REQUESTS),
        )
        yield GaugeMetricFamily(
            "forward_sessions_parked",
            "resumable sessions whose connection broke, waiting for their client",
            value=s.total(Stat.SESSIONS_PARKED),
        )
        yield labelled(
            s,
            "forward_resume_events",
            "session resume: parks, resumes, takeovers, expired parks, refused resumes, "
            "and stalls (reading from R paused for an unacknowledged window)",
            "event",
            (
                ("park", Stat.PARKS),
                ("resume", Stat.RESUMES),
                ("takeover", Stat.TAKEOVERS),
                ("expired", Stat.PARKS_EXPIRED),
                ("refused", Stat.RESUMES_REFUSED),
                ("stall", Stat.RESUME_STALLS),
            ),
        )
        yield CounterMetricFamily(
            "forward_resume_replayed_bytes",
            "bytes of R's stream sent again to a client after it resumed",
            value=s.total(Stat.REPLAYED_BYTES),
        )
        yield GaugeMetricFamily(
            "forward_warm_sessions",
            "greeted Rserve connections waiting in the --warm pool",
            value=s.total(Stat.WARM_IDLE),
        )
        yield labelled(
            s,
            "forward_warm_events",
            "the --warm pool: connections handed to sessions, sessions that found it empty "
            "(miss), pooled connections R closed (discarded), failed attempts to open one",
            "event",
            (
                ("handed", Stat.WARM_HANDED),
                ("miss", Stat.WARM_MISSES),
                ("discarded", Stat.WARM_DISCARDED),
                ("failed", Stat.WARM_FAILURES),
            ),
        )
        http = CounterMetricFamily(
            "forward_http_requests",
            "HTTP requests answered, by status (101: WebSocket)",
            labels=["status"],
        )
        for status, n in sorted(s.http_totals().items()):
            http.add_metric([status], n)
        yield http
        yield GaugeMetricFamily(
            "forward_workers", "worker processes configured", value=self.workers
        )
        per = CounterMetricFamily(
            "forward_worker_sessions",
            "WebSocket sessions by worker process (0 without --workers)",
            labels=["worker"],
        )
        for row, n in enumerate(s.per_row(Stat.SESSIONS_TOTAL)):
            per.add_metric([str(row)], n)
        yield per


class Status:
    """What changes in a running forward's answers: while it drains, new sessions are refused
    and health probes fail, so that load balancers send them elsewhere, while the sessions here
    (and their resumes) carry on."""

    draining = False


class Admin:
    """What the admin handlers need: the QAP socket to probe, the counters to show, and the
    forward's `Status`."""

    def __init__(
        self, socket_path: str, stats: Stats, workers: int = 1, status: Status | None = None
    ) -> None:
        self.socket_path = socket_path
        self.status = status or Status()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(stats, workers))


async def probe(path: str, limit: float = PROBE_TIMEOUT) -> str | None:
    """None when an Rserve answers on `path`, else why not."""
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                head = await reader.readexactly(HEADER_SIZE)
            finally:
                writer.close()
    except TimeoutError:
        return f"no Rserve greeting from {path} within {limit:g} s"
    except asyncio.IncompleteReadError:
        return f"{path} closed the connection without a greeting"
    except OSError as exc:
        return f"cannot connect to {path}: {exc.strerror or exc}"
    try:
        classify_greeting(head)  # what a session would make of it
    except QAPError as exc:
        return f"{path} did not answer with an Rserve greeting ({exc.reason})"
    return None


async def healthz(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    if admin.status.draining:
        return web.Response(
            status=503,
            text="draining: no new sessions here; open ones carry on\n",
            headers={"Cache-Control": "no-store"},
        )
    problem = await probe(admin.socket_path)
    if problem is None:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})
    log.warning("health check: %s", problem)
    return web.Response(status=503, text=problem + "\n", headers={"Cache-Control": "no-store"})


async def livez(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.StreamResponse:
    body = generate_latest(request.app[ADMIN].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_admin_app(admin: Admin) -> web.Application:
    app = web.Application()
    app[ADMIN] = admin
    for path, handler in (
        ("/healthz", healthz),
        ("/readyz", healthz),
        ("/livez", livez),
        ("/metrics", metrics),
    ):
        app.router.add_get(path, handler)
    return app


def count_tls_failures(context: ssl.SSLContext, row: Slot) -> None:
    """Count failed TLS handshakes on connections made with `context`.

    asyncio and uvloop report a failed handshake only in debug mode, but both run it through
    `context.wrap_bio(...).do_handshake()`, so a subclass of SSLObject sees every outcome.
    """

    class CountingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # not a failure: the handshake needs more bytes
            except (ssl.SSLError, OSError):
                row.add(Stat.TLS_HANDSHAKE_FAILURES)
                raise

    context.sslobject_class = CountingSSLObject
