"""Start the real server as a subprocess on free loopback ports and talk to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.clients.bench import free_port
from loramux.clients.client import LoraMuxClient

SERVICE = "loramux.v1.LoraMux"


class ServerProcess:
    # A free port can be taken by another test worker between free_port() and the server's bind:
    # a server that exits on that (server/app.py's message), before it served, starts again on
    # other ports, this many times.
    PORT_RETRIES = 3

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.args, self.env, self.log_path = args, env, log_path
        self.retries = 0
        self._start()

    def _start(self) -> None:
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.base_url = f"http://127.0.0.1:{self.http_port}/v1"
        cmd = [sys.executable, "-m", "loramux.server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port), *self.args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})})
        self.channel = grpc.insecure_channel(self.target)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.client = LoraMuxClient(channel=self.channel)

    def _restarted_on_a_taken_port(self, seen: list) -> bool:
        served = health_pb2.HealthCheckResponse.SERVING in seen
        if served or self.retries >= self.PORT_RETRIES or "in use" not in self.log().lower():
            return False
        self.retries += 1
        self.channel.close()
        self._log.close()
        self._start()
        return True

    def health_status(self, service: str = SERVICE):
        try:
            return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return None

    def wait_until(self, status, timeout: float = 120.0, service: str = SERVICE) -> list:
        """Poll health until ``status``; return every distinct status seen on the way."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._restarted_on_a_taken_port(seen):
                    continue
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            s = self.health_status(service)
            if s is not None and (not seen or seen[-1] != s):
                seen.append(s)
            if s == status:
                return seen
            time.sleep(0.02)
        raise TimeoutError(f"health never reached {status}; saw {seen}\n{self.log()}")

    def wait_ready(self):
        return self.wait_until(health_pb2.HealthCheckResponse.SERVING)

    def metrics(self) -> dict[str, float]:
        """Parse /metrics into {"name{labels}": value} (labels as printed)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def openai(self, token: str = "none", **kwargs):
        """The official OpenAI client, pointed at this server's HTTP API."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=token, max_retries=0, timeout=60, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
