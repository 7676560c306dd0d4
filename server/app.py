"""Builds the gRPC server around the engine: health, reflection, signals and drain."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..v1 import loramux_pb2, loramux_pb2_grpc
from .config import ServerConfig
from .grpc_service import LoraMuxServicer

log = logging.getLogger(__name__)
SERVICE_NAME = loramux_pb2.DESCRIPTOR.services_by_name["LoraMux"].full_name  # "loramux.v1.LoraMux"
DRAIN_POLL_S = 0.05


class App:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        self.servicer = LoraMuxServicer(config)
        self.built = None
        self._metrics_server = None
        self._stopping = asyncio.Event()
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
        port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)  # readiness: model loading
        await self.server.start()
        log.info("listening on %s:%d (model loading)", self.config.host, port)
        return port

    async def load(self) -> None:
        from .builder import build_engine  # torch and transformers load here, after the port is open
        from .prompts import PromptRenderer

        self.built = await asyncio.get_running_loop().run_in_executor(None, build_engine, self.config)
        self._start_metrics()
        self.built.engine.start()
        self.servicer.attach(self.built, PromptRenderer(self.built.tokenizer))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: serving %s on %s:%d", self.built.loaded.name, self.config.host, self.config.port)

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        from .metrics import Metrics

        metrics = Metrics(self.built, self.config.metrics_top_adapters)
        if self.config.metrics_port:
            self._metrics_server, _ = start_http_server(self.config.metrics_port, self.config.metrics_host,
                                                        registry=metrics.registry)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.config.metrics_port)

    def on_signal(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        self._stopping.set()

    async def drain(self, timeout: float) -> None:
        """Readiness off, refuse new requests, let running ones finish (up to timeout), stop."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.built is not None:
            engine = self.built.engine
            engine.stop_accepting()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while engine.num_in_flight and loop.time() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
        await self.server.stop(grace=1.0)
        if self.built is not None:
            self.built.engine.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def run(self, drain_timeout: float = 30.0) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal)
        loader = asyncio.create_task(self.load())
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({loader, stop}, return_when=asyncio.FIRST_COMPLETED)
        if loader in done:
            loader.result()  # a failed load raises here and the process exits non-zero
            await stop
        log.info("draining: up to %.0f s for running requests", drain_timeout)
        await self.drain(drain_timeout)
        log.info("stopped")


async def _serve(config: ServerConfig, drain_timeout: float) -> None:
    await App(config).run(drain_timeout)  # grpc.aio objects must be made inside the running loop


def serve(config: ServerConfig, drain_timeout: float = 30.0) -> None:
    asyncio.run(_serve(config, drain_timeout))
