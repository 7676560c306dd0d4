"""Reliability and security against the real server: after each fault a canary loop of greedy
requests (base model and two adapters) has succeeded with its baseline output, and gauges, pins,
KV usage and health are back to idle."""

import asyncio
import os
import pickle
import random
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from loramux.clients.aio import AsyncLoraMuxClient
from loramux.clients.client import LoraMuxClient
from loramux.clients.types import Sampling, Tls, generate_request
from loramux.v1 import loramux_pb2 as pb

from server import ServerProcess
from test_grpc import PROMPT_IDS, code_of, wait_idle

SERVING = health_pb2.HealthCheckResponse.SERVING
CANARY_ADAPTERS = ("", "attn-r4", "all-r8")  # every server these tests start registers them


class Canary(threading.Thread):
    """Greedy requests in a loop; each must succeed with its baseline output."""

    def __init__(self, server, token=None, tls=None):
        super().__init__(daemon=True)
        self.client = LoraMuxClient(server.target, token=token, tls=tls)
        self.sampling = Sampling(max_new_tokens=6, ignore_eos=True)
        self.baseline = {a: self._one(a) for a in CANARY_ADAPTERS}
        self.failures, self.count = [], 0
        self._stop_event = threading.Event()

    def _one(self, adapter):
        return self.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter, sampling=self.sampling).token_ids

    def run(self):
        while not self._stop_event.is_set():
            adapter = CANARY_ADAPTERS[self.count % len(CANARY_ADAPTERS)]
            try:
                got = self._one(adapter)
                if got != self.baseline[adapter]:
                    self.failures.append((adapter, got))
            except grpc.RpcError as e:
                self.failures.append((adapter, e.code(), e.details()))
            self.count += 1

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._stop_event.set()
        self.join(30)
        self.client.close()


def assert_recovered(server, canary):
    assert canary.count > 0 and canary.failures == []
    m = wait_idle(server)
    assert m["loramux_kv_cache_usage_ratio"] == 0 and m["loramux_adapter_pins"] == 0
    assert server.health_status() == SERVING


@pytest.fixture(scope="module")
def rserver(tiny_llama, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("rroot")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-dir", str(next(iter(tiny_adapters.values())).parent),
         "--adapter-root", str(root), "--allow-runtime-adapters", "--max-batch-size", "8",
         "--max-model-len", "128", "--max-input-tokens", "40", "--max-total-tokens", "60",
         "--max-new-tokens-limit", "30", "--default-max-new-tokens", "8", "--max-queued-requests", "256",
         "--max-stop-sequences", "4", "--max-stop-length", "16", "--inject-fault", "request:bad-request"],
        tmp_path_factory.mktemp("rlogs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    yield proc
    proc.stop()


def test_token_limits_are_named(rserver):
    with Canary(rserver) as canary:
        for kwargs, needle in [
            (dict(prompt_token_ids=[7] * 41), "max_input_tokens is 40"),
            (dict(prompt_token_ids=[7] * 35, sampling=Sampling(max_new_tokens=30)), "max_total_tokens 60"),
            (dict(prompt_token_ids=[7] * 3, sampling=Sampling(max_new_tokens=31)), "[1, 30]"),
            (dict(prompt="x", sampling=Sampling(stop=["a"] * 5)), "limit is 4"),
            (dict(prompt="x", sampling=Sampling(stop=["a" * 17])), "1 to 16 characters"),
        ]:
            code, details = code_of(rserver.client.generate, **kwargs)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details
    assert_recovered(rserver, canary)


def test_a_fault_in_one_request_fails_it_alone(rserver):
    with Canary(rserver) as canary:
        others = [threading.Thread(target=rserver.client.generate,
                                   kwargs=dict(prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=20)))
                  for _ in range(4)]
        for t in others:
            t.start()
        code, details = code_of(rserver.client.generate, prompt_token_ids=PROMPT_IDS, request_id="bad-request")
        for t in others:
            t.join()
    assert code == grpc.StatusCode.INTERNAL and "bad-request" in details
    assert "request bad-request failed" in rserver.log()
    assert_recovered(rserver, canary)


def test_stress_200_clients_with_random_cancels(rserver):
    async def one(client, i, rng):
        call = client.stub.GenerateStream(pb.GenerateRequest(
            prompt_token_ids=PROMPT_IDS, adapter_id=CANARY_ADAPTERS[i % 3],
            sampling=pb.SamplingParams(max_new_tokens=rng.randint(1, 20), ignore_eos=True)))
        cancel_after = rng.choice([None, 0, 1, 3, 8])
        n = 0
        try:
            async for _ in call:
                n += 1
                if cancel_after is not None and n > cancel_after:
                    call.cancel()
            return "OK"
        except asyncio.CancelledError:
            return "CANCELLED"
        except grpc.aio.AioRpcError as e:
            return e.code().name

    async def main():
        rng = random.Random(0)
        async with AsyncLoraMuxClient(rserver.target) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i, rng) for i in range(200))), 50)

    with Canary(rserver) as canary:
        t0 = time.monotonic()
        statuses = asyncio.run(main())
        assert time.monotonic() - t0 < 50
    assert set(statuses) <= {"OK", "CANCELLED"} and statuses.count("OK") > 50
    assert_recovered(rserver, canary)


class MarkerPickle:
    """Unpickling this would create a marker file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_adapters_are_refused_and_never_unpickled(rserver, tiny_adapters, tmp_path):
    import shutil

    evil = shutil.copytree(tiny_adapters["attn-r4"], rserver.root / "evil")
    (evil / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (evil / "adapter_model.bin").write_bytes(pickle.dumps({"x": MarkerPickle(marker)}))
    with Canary(rserver) as canary:
        code, details = code_of(rserver.client.register_adapter, "evil", str(evil))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--allow-pickle" in details
    assert not marker.exists()
    assert "evil" not in {a.adapter_id for a in rserver.client.list_adapters()}
    assert_recovered(rserver, canary)


@pytest.fixture(scope="module")
def secured(tiny_llama, tiny_adapters, tmp_path_factory):
    """--allow-pickle, --auth-token, --admin-token, and a small queue bound."""
    root = tmp_path_factory.mktemp("sroot")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-root", str(root), "--allow-pickle", "--auth-token", "user-secret",
         "--admin-token", "admin-secret", "--max-queued-requests", "8", "--max-batch-size", "4",
         "--adapter", f"attn-r4={tiny_adapters['attn-r4']}", "--adapter", f"all-r8={tiny_adapters['all-r8']}"],
        tmp_path_factory.mktemp("slogs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    proc.user = LoraMuxClient(proc.target, token="user-secret")
    proc.admin = LoraMuxClient(proc.target, token="admin-secret")
    yield proc
    proc.stop()


def test_auth_tokens(secured):
    with Canary(secured, token="user-secret") as canary:
        check_auth(secured)
    assert_recovered(secured, canary)


def check_auth(secured):
    assert code_of(secured.client.generate, prompt="hi")[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(LoraMuxClient(secured.target, token="nope").generate, prompt="hi")[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    assert secured.user.generate(prompt="hi", sampling=Sampling(max_new_tokens=2)).completion_tokens >= 1
    assert {a.adapter_id for a in secured.user.list_adapters()} == {"attn-r4", "all-r8"}  # reads need the user token
    assert code_of(secured.client.server_info)[0] == grpc.StatusCode.UNAUTHENTICATED
    # registration needs the admin token, and the user token is not enough
    assert code_of(secured.user.register_adapter, "a", str(secured.root))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(secured.client.unregister_adapter, "a")[0] == grpc.StatusCode.UNAUTHENTICATED
    # health and reflection stay open
    assert secured.health_status() == SERVING


def test_weights_only_pickle_with_allow_pickle(secured, tiny_adapters, tmp_path):
    with Canary(secured, token="user-secret") as canary:
        check_pickle(secured, tiny_adapters, tmp_path)
    assert_recovered(secured, canary)


def check_pickle(secured, tiny_adapters, tmp_path):
    import shutil

    from safetensors.torch import load_file

    evil = shutil.copytree(tiny_adapters["attn-r4"], secured.root / "evil")
    (evil / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (evil / "adapter_model.bin").write_bytes(pickle.dumps({"x": MarkerPickle(marker)}))
    code, details = code_of(secured.admin.register_adapter, "evil", str(evil))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and not marker.exists()
    benign = shutil.copytree(tiny_adapters["attn-r4"], secured.root / "benign")
    torch.save(load_file(benign / "adapter_model.safetensors"), benign / "adapter_model.bin")
    (benign / "adapter_model.safetensors").unlink()
    secured.admin.register_adapter("benign", str(benign))
    safe = shutil.copytree(tiny_adapters["attn-r4"], secured.root / "safe")
    secured.admin.register_adapter("safe", str(safe))
    greedy = Sampling(max_new_tokens=8, ignore_eos=True)
    assert secured.user.generate(prompt_token_ids=PROMPT_IDS, adapter_id="benign", sampling=greedy).token_ids == \
        secured.user.generate(prompt_token_ids=PROMPT_IDS, adapter_id="safe", sampling=greedy).token_ids


def test_queue_bound_holds_under_a_burst(secured):
    peak, stop = [0], threading.Event()

    def scrape():
        while not stop.is_set():
            m = secured.metrics()
            peak[0] = max(peak[0], m["loramux_running_requests"] + m["loramux_waiting_requests"])

    results = []

    def call():
        try:
            secured.user.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=60, ignore_eos=True))
            results.append("OK")
        except grpc.RpcError as e:
            results.append(e.code().name)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    burst = [threading.Thread(target=call) for _ in range(40)]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    stop.set()
    scraper.join()
    assert set(results) <= {"OK", "RESOURCE_EXHAUSTED"} and "RESOURCE_EXHAUSTED" in results
    assert 1 <= peak[0] <= 8


def test_runtime_registration_is_off_by_default(tiny_llama, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--adapter-root", str(tmp_path)], tmp_path / "log")
    try:
        proc.wait_ready()
        code, details = code_of(proc.client.register_adapter, "a", str(tmp_path))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "--allow-runtime-adapters" in details
    finally:
        proc.stop()


def test_tls_and_mutual_tls(tiny_llama, tiny_adapters, tmp_path):
    from certs import make_certs

    c = make_certs(tmp_path)
    proc = ServerProcess(["--model", str(tiny_llama), "--tls-cert", str(c["server"]), "--tls-key", str(c["server_key"]),
                          "--tls-client-ca", str(c["ca"]), "--adapter", f"attn-r4={tiny_adapters['attn-r4']}",
                          "--adapter", f"all-r8={tiny_adapters['all-r8']}"], tmp_path / "log")
    try:
        mtls = Tls(c["ca"].read_bytes(), c["client"].read_bytes(), c["client_key"].read_bytes())
        client = LoraMuxClient(proc.target, tls=mtls)
        deadline = time.monotonic() + 120
        while True:  # health over the mutual-TLS channel
            try:
                if client.server_info():
                    break
            except grpc.RpcError:
                assert time.monotonic() < deadline, proc.log()
                time.sleep(0.2)
        assert client.generate(prompt="hi", sampling=Sampling(max_new_tokens=2)).completion_tokens >= 1
        canary = Canary(proc, tls=mtls)
        canary.start()
        no_cert = LoraMuxClient(proc.target, tls=Tls(c["ca"].read_bytes()))
        assert code_of(no_cert.generate, prompt="hi", timeout=5)[0] == grpc.StatusCode.UNAVAILABLE
        plain = LoraMuxClient(proc.target)
        assert code_of(plain.generate, prompt="hi", timeout=5)[0] == grpc.StatusCode.UNAVAILABLE
        ctx = ssl.create_default_context(cafile=str(c["ca"]))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(f"https://127.0.0.1:{proc.metrics_port}/metrics", context=ctx, timeout=5)
        ctx.load_cert_chain(str(c["client"]), str(c["client_key"]))
        body = urllib.request.urlopen(f"https://127.0.0.1:{proc.metrics_port}/metrics", context=ctx, timeout=5).read()
        assert b"loramux_requests_total" in body
        canary.__exit__()
        assert canary.count > 0 and canary.failures == []
    finally:
        proc.stop()


def test_fatal_engine_fault_fails_everyone_and_exits_nonzero(tiny_llama, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--inject-fault", "fatal:boom"], tmp_path / "log")
    try:
        proc.wait_ready()
        results = {}

        def call(rid):
            try:
                proc.client.generate(prompt_token_ids=PROMPT_IDS, request_id=rid,
                                     sampling=Sampling(max_new_tokens=200, ignore_eos=True), timeout=30)
                results[rid] = "OK"
            except grpc.RpcError as e:
                results[rid] = e.code()

        others = [threading.Thread(target=call, args=(f"r{i}",)) for i in range(4)]
        for t in others:
            t.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        call("boom")
        for t in others:
            t.join()
        assert time.monotonic() - t0 < 20  # nobody hangs
        assert results["boom"] == grpc.StatusCode.INTERNAL
        # every request still in flight failed; one that finished before the fault may be OK
        assert set(results.values()) <= {grpc.StatusCode.INTERNAL, "OK"} and len(results) == 5
        assert proc.health_status() != SERVING  # NOT_SERVING while stopping, or already gone
        assert "fatal engine error" in proc.log()
        assert proc.proc.wait(30) == 3  # EXIT_FATAL
    finally:
        proc.stop()


QUEUED = 32  # behind the running request in test_second_sigterm_exits_at_once


def test_second_sigterm_exits_at_once(tiny_llama, tmp_path):
    """A second SIGTERM during the drain exits without waiting for it. The drain has work for many
    seconds on any CPU: one request at a time (--max-batch-size 1), one running and QUEUED more
    waiting, each 480 tokens (the tiny model's room). The first SIGTERM starts the drain; the
    second, as soon as health reports it, must end the process within 5 s, while most of that work
    is still undone (checked: a drain that ignored the second signal would run it all)."""
    proc = ServerProcess(["--model", str(tiny_llama), "--drain-timeout", "60", "--max-batch-size", "1"],
                         tmp_path / "log")
    sampling = Sampling(max_new_tokens=480, ignore_eos=True)
    try:
        proc.wait_ready()
        stream = proc.client.generate_stream(prompt_token_ids=PROMPT_IDS, sampling=sampling)
        next(stream)
        queued = [proc.client.stub.Generate.future(generate_request(prompt_token_ids=PROMPT_IDS, sampling=sampling))
                  for _ in range(QUEUED)]
        deadline = time.monotonic() + 10
        while proc.metrics()["loramux_waiting_requests"] < QUEUED - 1:  # all accepted (one may have started)
            assert time.monotonic() < deadline, proc.metrics()["loramux_waiting_requests"]
            time.sleep(0.01)
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_until(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        assert sum(f.done() for f in queued) < QUEUED // 2  # the drain has most of its work ahead
        t0 = time.monotonic()
        os.kill(proc.proc.pid, signal.SIGTERM)
        proc.proc.wait(10)
        assert time.monotonic() - t0 < 5
    finally:
        proc.stop()


def test_a_server_stopped_while_its_model_loads_exits_at_once(tiny_llama, tmp_path):
    """SIGTERM as soon as the port is open, while torch and the model are still loading (seconds):
    nothing was served, so the server exits at once instead of waiting for the load to finish."""
    proc = ServerProcess(["--model", str(tiny_llama)], tmp_path / "log", exec_start=True)  # torch not yet imported
    try:
        proc.wait_until(health_pb2.HealthCheckResponse.SERVING, service="")  # liveness: listening
        assert proc.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING  # not ready: loading
        t0 = time.monotonic()
        proc.terminate()
        assert proc.proc.wait(30) == 0
        assert time.monotonic() - t0 < 2, proc.log()
        log = proc.log()
        assert "stopped before the model was loaded" in log and "ready:" not in log
    finally:
        proc.stop()


def _mutate_config(**change):
    def apply(path):
        import json

        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(change)
        (path / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return apply


def _mutate_weights(fn):
    def apply(path):
        from safetensors.torch import load_file, save_file

        save_file(fn(load_file(path / "adapter_model.safetensors")), path / "adapter_model.safetensors")
    return apply


def _raw(fn):
    def apply(path):
        f = path / "adapter_model.safetensors"
        f.write_bytes(fn(f.read_bytes()))
    return apply


BAD_ADAPTERS = {
    "config-not-json": (lambda p: (p / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    "no-r": (_mutate_config(r=None), "'r'"),
    "no-alpha": (_mutate_config(lora_alpha=None), "lora_alpha"),
    "no-targets": (_mutate_config(target_modules=None), "target_modules"),
    "dora": (_mutate_config(use_dora=True), "use_dora"),
    "modules-to-save": (_mutate_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "unknown-target": (_mutate_config(target_modules=["q_proj", "wizard_proj"]), "wizard_proj"),
    "rank-too-big": (_mutate_weights(lambda t: {k: torch.cat([v] * 20, dim=0 if "lora_A" in k else 1)
                                                  for k, v in t.items()}), "--max-lora-rank is 64"),
    "wrong-shape": (_mutate_weights(lambda t: {k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in t.items()}),
                    "do not fit"),
    "header-truncated": (_raw(lambda b: b[:20]), "truncated"),
    "header-oversized": (_raw(lambda b: (2**40).to_bytes(8, "little") + b[8:]), "limit"),
    "bad-offsets": (_raw(lambda b: b[:-64]), "offsets"),
}


@pytest.mark.parametrize("name", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_with_a_clear_message(rserver, tiny_adapters, name):
    import shutil

    mutate, needle = BAD_ADAPTERS[name]
    path = shutil.copytree(tiny_adapters["attn-r4"], rserver.root / f"bad-{name}")
    mutate(path)
    with Canary(rserver) as canary:
        code, details = code_of(rserver.client.register_adapter, f"bad-{name}", str(path))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and needle in details, details
    assert f"bad-{name}" not in {a.adapter_id for a in rserver.client.list_adapters()}
    assert_recovered(rserver, canary)


def test_nan_weights_fail_their_requests_and_nothing_is_cached(rserver, tiny_adapters):
    import shutil

    path = shutil.copytree(tiny_adapters["attn-r4"], rserver.root / "nan")
    _mutate_weights(lambda t: {k: v * float("nan") if "lora_B" in k else v for k, v in t.items()})(path)
    rserver.client.register_adapter("nan", str(path))  # the header is fine; the values are read at load
    with Canary(rserver) as canary:
        code, details = code_of(rserver.client.generate, prompt_token_ids=PROMPT_IDS, adapter_id="nan")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "NaN" in details
    assert {a.adapter_id: a for a in rserver.client.list_adapters()}["nan"].tier == "disk"
    assert_recovered(rserver, canary)
