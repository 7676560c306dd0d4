"""Start the real server as a subprocess on free loopback ports and talk to it.

A server process is forked from a per-worker fork server that has already imported torch and
transformers (about 5 s of CPU a start, most of a tiny model's start-up, and the suite starts
dozens): the child then runs the real entry point, ``loramux.server.cli.main``, with the server's
arguments, environment and log, and exits as the server does (``os._exit``), so nothing of the
test process's state reaches it. A server started with ``exec_start=True``, or every server under
``LORAMUX_TEST_SERVER_START=exec``, is ``python -m loramux.server.cli serve`` instead: the shared
module server (tests/integration/conftest.py), tests that need the seconds of a cold start, the
refused-start tests and the benchmark smoke tests.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.clients.bench import free_ports
from loramux.clients.client import LoraMuxClient

SERVICE = "loramux.v1.LoraMux"
# The server's heaviest imports; a name that a transformers version lacks is skipped by the fork server.
PRELOAD = ["torch", "safetensors.torch", "transformers.activations", "transformers.masking_utils",
           "transformers.models.llama.modeling_llama"]


@functools.cache
def _fork_server():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _serve_in_child(argv: list[str], env: dict, log_path: str) -> None:
    """The forked child: the server's environment and log, then the CLI's own main."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # as PYTHONUNBUFFERED does, which the fork server read before this server's environment existed
    sys.stdout = io.TextIOWrapper(open(1, "wb", 0, closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", 0, closefd=False), write_through=True)
    multiprocessing.set_start_method("fork", force=True)  # a plain process's default, not the fork server's
    from loramux.server import cli

    sys.argv = [cli.__file__, *argv]
    sys.exit(cli.main(argv))


class ForkedProcess:
    """The slice of ``subprocess.Popen`` the tests use, over a fork server's child."""

    def __init__(self, argv: list[str], env: dict, log_path: Path):
        self.args = argv
        self._process = _fork_server().Process(target=_serve_in_child, args=(argv, env, str(log_path)))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ServerProcess:
    # A free port can be taken by another test worker between free_port() and the server's bind:
    # a server that exits on that (server/app.py's message), before it served, starts again on
    # other ports, this many times.
    PORT_RETRIES = 3

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, exec_start: bool = False):
        self.args, self.env, self.log_path = args, env, log_path
        # a variable that a process reads as it starts (OMP_*, PYTHON*) would not reach a forked child
        self.exec_start = exec_start or bool(env) or os.environ.get("LORAMUX_TEST_SERVER_START") == "exec"
        self.retries = 0
        self._start()

    def _start(self) -> None:
        self.port, self.metrics_port, self.http_port = free_ports(3)
        self.target = f"127.0.0.1:{self.port}"
        self.base_url = f"http://127.0.0.1:{self.http_port}/v1"
        argv = ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                "--http-port", str(self.http_port), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self._log = open(self.log_path, "wb")
        if self.exec_start:
            self.proc = subprocess.Popen([sys.executable, "-m", "loramux.server.cli", *argv], stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env)
        else:
            self.proc = ForkedProcess(argv, env, self.log_path)
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
