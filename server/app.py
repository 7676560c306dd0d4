"""Builds the gRPC server around the engine: auth, TLS, health, reflection, signals and drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..v1 import loramux_pb2, loramux_pb2_grpc
from .auth import AuthInterceptor
from .config import ServerConfig, StartupError
from .grpc_parse import ParseInterceptor
from .grpc_service import LoraMuxServicer
from .service import Service

log = logging.getLogger(__name__)
SERVICE_NAME = loramux_pb2.DESCRIPTOR.services_by_name["LoraMux"].full_name  # "loramux.v1.LoraMux"
DRAIN_POLL_S = 0.05
EXIT_FATAL = 3
EXIT_CONFIG = 2  # as for a bad flag
EXIT_LOAD_FAILED = 1
CANNOT_BIND = "the port is in use, or the address is not this host's"
FATAL_EXIT_GRACE_S = 10.0  # after a fatal fault the process exits by then, even if the event loop is stuck


def http_listener(host: str, port: int) -> socket.socket:
    """The HTTP API's listening socket. Made with its protocol named (IPPROTO_TCP), because asyncio
    turns Nagle's algorithm off only on connections whose socket says TCP, and a socket made with
    protocol 0 (``socket.create_server``'s) passes 0 to every connection it accepts: with Nagle on,
    a response's body, written after its headers, waits for the client's delayed ACK (40 ms on
    Linux) on every reused keep-alive connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name == "posix":  # as socket.create_server: a restart rebinds past TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as socket.create_server: IPv6 only, whatever the host's default
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def _read_flag_file(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"{flag} {path}: {e.strerror or e}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    pair = [(_read_flag_file("--tls-key", config.tls_key), _read_flag_file("--tls-cert", config.tls_cert))]
    if config.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=_read_flag_file("--tls-client-ca", config.tls_client_ca),
                                       require_client_auth=True)


def refuse_metrics_port_in_use(host: str, port: int) -> None:
    """Binds the metrics address as prometheus-client will (its first address, SO_REUSEADDR) and
    lets go. Its server starts once the model has loaded (the collectors read the engine), but a port
    in use is refused before a load of minutes."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as e:
        raise metrics_bind_error(host, port, e) from None


def metrics_bind_error(host: str, port: int, e: OSError) -> StartupError:
    return StartupError(f"cannot serve metrics on {host}:{port} (--metrics-host, --metrics-port): {e.strerror or e}")


class ReadinessHealth(health.aio.HealthServicer):
    """gRPC health whose readiness also reads the engine's state directly: once the engine has
    died, Check answers NOT_SERVING even if the event loop never ran the status update."""

    def __init__(self, failed):
        super().__init__()
        self._failed = failed

    async def Check(self, request, context):
        if request.service == SERVICE_NAME and self._failed():
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return await super().Check(request, context)


class App:
    def __init__(self, config: ServerConfig):
        self.config = config
        interceptors = []
        if config.auth_token or config.admin_token:
            interceptors.append(AuthInterceptor(config.auth_token, config.admin_token))
        interceptors.append(ParseInterceptor())  # innermost: a refused token is refused before parsing
        self.server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)],
                                      maximum_concurrent_rpcs=config.concurrent_rpc_limit)
        self.health = ReadinessHealth(lambda: self.built is not None and self.built.engine.fatal_error is not None)
        self.work = None
        self.service = Service(config)
        self.servicer = LoraMuxServicer(self.service)
        self.built = None
        self.port = None  # the gRPC port bound (--port 0: one the system chose)
        self.metrics = None
        self._metrics_server = None
        self._http = None  # uvicorn server, when --http-port is set
        self._http_task = None
        self._stopping = asyncio.Event()
        self._fatal = asyncio.Event()
        self._signals = 0
        loramux_pb2_grpc.add_LoraMuxServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )

    async def _set_health(self, status) -> None:
        await self.health.set(SERVICE_NAME, status)

    async def start(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        creds = server_credentials(self.config)
        try:  # a name that does not resolve: said here, before grpc logs a line of its own for it
            socket.getaddrinfo(self.config.host.strip("[]"), self.config.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
        except OSError as e:
            raise StartupError(f"cannot listen on {address} (--host, --port): {e.strerror or e}") from None
        try:
            port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind"
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {address} (--host, --port): {CANNOT_BIND}")
        if self.config.metrics_port:
            refuse_metrics_port_in_use(self.config.metrics_host, self.config.metrics_port)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)  # readiness: model loading
        await self.server.start()
        self.port = port
        log.info("listening on %s:%d%s (model loading)", self.config.host, port, " with TLS" if creds else "")
        if self.config.http_port:
            await self._start_http()
        return port

    async def _start_http(self) -> None:
        """The OpenAI-compatible API on the same event loop; FastAPI and uvicorn load only here."""
        import uvicorn

        from .http_api import build_app

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the App owns SIGTERM/SIGINT and drains both front-ends
                yield

        c = self.config
        tls = {}
        if c.tls_cert:
            tls = dict(ssl_certfile=c.tls_cert, ssl_keyfile=c.tls_key)
            if c.tls_client_ca:
                tls.update(ssl_ca_certs=c.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(build_app(self.service, self._metrics_text), host=c.http_bind_host, port=c.http_port,
                                lifespan="off", access_log=False, log_config=None, log_level="warning",
                                timeout_keep_alive=c.http_keep_alive_timeout,
                                timeout_graceful_shutdown=max(1, int(c.drain_timeout)), **tls)
        # bound here, not by uvicorn, whose bind failure is a sys.exit that takes the event loop down
        try:
            sock = http_listener(c.http_bind_host, c.http_port)
        except OSError as e:
            raise StartupError(f"cannot serve HTTP on {c.http_bind_host}:{c.http_port} (--http-host, --http-port): "
                               f"{e.strerror or e}") from None
        self._http = Server(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
                raise StartupError("the HTTP server stopped as it started")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if tls else "http", c.http_bind_host,
                 c.http_port)

    def _metrics_text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return (generate_latest(self.metrics.registry) if self.metrics else b""), CONTENT_TYPE_LATEST

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        self.built = await loop.run_in_executor(None, _build_engine, self.config)
        from .metrics import RequestLog
        from .offload import Offload
        from .torch_threads import serial_openmp

        self.built.engine.observers.append(RequestLog())
        self.built.engine.on_fatal = lambda error: self._on_fatal(loop)
        self._start_metrics()
        self.built.engine.start()
        c = self.config
        self.work = Offload(c.work_threads, c.work_timeout, initializer=serial_openmp)
        self.service.attach(self.built, self.work)
        if c.dynamic_adapters:
            log.warning("--dynamic-adapters: any inference caller may register adapters found under %s",
                        ", ".join(c.adapter_roots))
        frozen = freeze_heap()
        log.info("%d objects alive at start-up left out of garbage collection from here on", frozen)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: serving %s on %s:%d", self.built.loaded.name, self.config.host, self.port)

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        from .metrics import Metrics

        metrics = self.metrics = Metrics(self.built, self.config.metrics_top_adapters)
        self.service.on_rejected = metrics.rejected
        self.service.on_dynamic = metrics.dynamic
        metrics.watch_responses(self.service.responses)
        c = self.config
        if c.metrics_port:
            tls = {}
            if c.tls_cert:
                tls = dict(certfile=c.tls_cert, keyfile=c.tls_key, client_cafile=c.tls_client_ca,
                           client_auth_required=c.tls_client_ca is not None)
            try:
                self._metrics_server, _ = start_http_server(c.metrics_port, c.metrics_host, registry=metrics.registry,
                                                            **tls)
            except OSError as e:
                raise metrics_bind_error(c.metrics_host, c.metrics_port, e) from None
            log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", c.metrics_host, c.metrics_port)

    def on_signal(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        self._stopping.set()

    def _on_fatal(self, loop) -> None:
        """Engine thread, on a fatal fault, before any request fails. Readiness is already off
        (ReadinessHealth reads engine.fatal_error). Nothing here waits for the event loop: a
        watchdog exits the process if the loop cannot stop it in time."""
        watchdog = threading.Timer(FATAL_EXIT_GRACE_S, _exit_now, (EXIT_FATAL,))
        watchdog.daemon = True
        watchdog.start()
        asyncio.run_coroutine_threadsafe(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), loop)
        loop.call_soon_threadsafe(self._fatal.set)

    async def drain(self, timeout: float) -> None:
        """Readiness off, refuse new requests, let accepted ones finish and be delivered to their
        callers (up to timeout), stop."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.built is not None:
            engine = self.built.engine
            engine.stop_accepting()
            while (engine.num_in_flight or engine.num_undelivered) and loop.time() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
        await self.server.stop(grace=max(1.0, deadline - loop.time()))
        if self._metrics_server is not None:
            # its thread sees the request at its next poll (up to 0.5 s later); nothing here waits for that
            threading.Thread(target=self._metrics_server.shutdown, daemon=True).start()
        if self._http is not None:
            self._http.should_exit = True
            await self._http_task
        if self.work is not None:
            self.work.close()
        if self.built is not None:
            self.built.engine.stop()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before the port opens: a prompt SIGTERM still drains
            loop.add_signal_handler(sig, self.on_signal)
        try:
            await self.start()
        except StartupError as e:
            log.critical("cannot start: %s", e)
            await self.drain(0.0)
            return EXIT_CONFIG
        loader = asyncio.create_task(self.load())
        stop = asyncio.create_task(self._stopping.wait())
        fatal = asyncio.create_task(self._fatal.wait())
        done, _ = await asyncio.wait({loader, stop}, return_when=asyncio.FIRST_COMPLETED)
        if loader not in done:
            # Nothing was served and nothing the load does (imports, weights, timing) needs finishing;
            # waiting for it would keep a stopped server up for as long as the load takes.
            await self.drain(0.0)
            log.info("stopped before the model was loaded")
            exit_process(0)
        try:
            loader.result()  # a failed load raises here and the process exits non-zero
        except StartupError as e:
            log.critical("cannot start: %s", e)
            await self.drain(0.0)
            return EXIT_CONFIG
        except Exception as e:  # a model folder transformers cannot read, say: its traceback, then a clean exit
            log.critical("cannot start: loading the model failed: %s", e, exc_info=True)
            await self.drain(0.0)
            return EXIT_LOAD_FAILED
        done, _ = await asyncio.wait({stop, fatal}, return_when=asyncio.FIRST_COMPLETED)
        fatal.cancel()
        if fatal in done:
            log.critical("fatal engine error: %r; stopping", self.built.engine.fatal_error)
            await self.drain(0.0)
            return EXIT_FATAL
        log.info("draining: up to %.0f s for running requests", self.config.drain_timeout)
        await self.drain(self.config.drain_timeout)
        log.info("stopped")
        return 0


def freeze_heap() -> int:
    """Collect the garbage there is, then move every object still alive (the model's modules,
    torch's and transformers' own, the registry's records: about 430 thousand when `loramux serve`
    runs the default model) into the collector's permanent generation, which its passes skip;
    returns how many. A full pass over them took about 210 ms on a 2-core EPYC, holding the GIL,
    and so stalled the engine's step loop for all requests; later passes see only what serving
    creates. Frozen objects are still freed by reference counting; only cycles among them stay
    (vLLM and SGLang freeze theirs too)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _build_engine(config: ServerConfig):
    """On a worker thread: torch and transformers load here, after the port is open and off the
    event loop, which answers health checks and signals meanwhile. The flags are checked first, with
    torch alone: a wrong one is refused about 5 s sooner than transformers' imports would allow."""
    from .preflight import preflight

    checked = preflight(config)
    from .builder import build_engine

    return build_engine(config, checked=checked)


def exit_process(code: int) -> NoReturn:
    """Exit now, with the logs and stdio flushed: no interpreter teardown (torch's, grpc's and
    transformers' take a second or more) and no wait for threads the caller has no need of."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_now(code: int) -> NoReturn:
    log.critical("the event loop did not stop the server within %.0f s of a fatal fault; exiting", FATAL_EXIT_GRACE_S)
    exit_process(code)


async def _serve(config: ServerConfig) -> int:
    return await App(config).run()  # grpc.aio objects must be made inside the running loop


def serve(config: ServerConfig) -> int:
    return asyncio.run(_serve(config))
