"""A soak: mixed concurrent load through both APIs against one real server whose small tiers force
paging, preemption and speculative drafts, while the canary's greedy requests must keep their
outputs. Afterwards nothing may be held and the log may hold no traceback."""

import os
import random
import shutil
import threading
import time

import grpc
import openai
import pytest

from loramux.clients.types import Sampling

from server import ServerProcess
from test_reliability import Canary, assert_recovered

# A short soak keeps `make test` short; LORAMUX_SOAK_SECONDS runs a longer one.
SOAK_SECONDS = float(os.environ.get("LORAMUX_SOAK_SECONDS", "10"))
CLIENT_STATUSES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                   grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
WORDS = ("alpha", "beta", "gamma", "delta", "the", "a")


@pytest.fixture(scope="module")
def soak_server(tiny_llama, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("soak-root")
    for name in ("attn-r4", "layer1-r4"):  # runtime registrations re-register these copies
        shutil.copytree(tiny_adapters[name], root / name)
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-dir", str(next(iter(tiny_adapters.values())).parent),
         "--adapter-root", str(root), "--allow-runtime-adapters", "--scheduling", "priority",
         "--max-batch-size", "8", "--max-model-len", "256", "--default-max-new-tokens", "16",
         "--max-queued-requests", "64", "--kv-cache-tokens", "512", "--max-tokens-per-step", "64",
         "--max-device-adapters", "3", "--max-host-adapters", "5", "--num-speculative-tokens", "2",
         "--prompt-lookup-min", "1"],
        tmp_path_factory.mktemp("soak-logs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    yield proc
    proc.stop()


class Load:
    """Worker threads that each run random operations until ``stop``; ``done`` counts each kind
    that succeeded, ``wrong`` keeps every answer that is no client-side status."""

    def __init__(self, server, adapters: list[str], seconds: float):
        self.server, self.adapters, self.stop = server, adapters, time.monotonic() + seconds
        self.done: dict[str, int] = {}
        self.wrong: list = []
        self.lock = threading.Lock()

    def ok(self, kind: str) -> None:
        with self.lock:
            self.done[kind] = self.done.get(kind, 0) + 1

    def run(self, workers: list) -> None:
        threads = [threading.Thread(target=w, args=(seed,)) for seed, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @staticmethod
    def prompt(rng) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 8, 20, 40])))

    def adapter(self, rng) -> str:
        return rng.choice(["", *self.adapters, "rt0", "rt1", "missing"])

    def grpc_worker(self, seed: int) -> None:
        rng, client = random.Random(seed), self.server.client
        while time.monotonic() < self.stop:
            op = rng.random()
            sampling = Sampling(max_new_tokens=rng.randint(1, 24), temperature=rng.choice([None, 0.8]),
                                seed=rng.randint(0, 9), logprobs=rng.choice([None, 2]),
                                regex=rng.choice([None, None, None, "[a-z]{2,6}"]))
            try:
                if op < 0.35:
                    client.generate(self.prompt(rng), adapter_id=self.adapter(rng), sampling=sampling,
                                    priority=rng.randint(-1, 1), timeout=60)
                    self.ok("generate")
                elif op < 0.6:
                    stream = client.generate_stream(self.prompt(rng), adapter_id=self.adapter(rng), sampling=sampling,
                                                    timeout=60)
                    for k, _ in enumerate(stream):
                        if k >= rng.randint(0, 4):
                            break
                    stream.close()  # cancels the request if it is not done
                    self.ok("stream cut")
                elif op < 0.7:
                    client.generate(self.prompt(rng), combine=[("attn-r4", 0.5), ("layer1-r4", -1.0)],
                                    sampling=sampling, timeout=60)
                    self.ok("combine")
                elif op < 0.8:
                    client.generate(self.prompt(rng), adapter_id=self.adapter(rng), sampling=sampling,
                                    timeout=rng.uniform(0.02, 0.3))
                    self.ok("within a deadline")
                elif op < 0.9:
                    name = rng.choice(["attn-r4", "layer1-r4"])
                    client.register_adapter(f"rt{rng.randint(0, 1)}", str(self.server.root / name), replace=True,
                                            timeout=60)
                    self.ok("register")
                else:
                    client.unregister_adapter(f"rt{rng.randint(0, 1)}", timeout=60)
                    self.ok("unregister")
            except grpc.RpcError as e:
                if e.code() not in CLIENT_STATUSES:
                    with self.lock:
                        self.wrong.append((e.code(), e.details()))

    def http_worker(self, seed: int) -> None:
        rng, client = random.Random(1000 + seed), self.server.openai()
        while time.monotonic() < self.stop:
            model, op = self.adapter(rng) or self.server.model_name, rng.random()
            try:
                if op < 0.3:
                    stream = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": self.prompt(rng)}], stream=True,
                        max_tokens=rng.randint(1, 20), temperature=rng.choice([0, 1]))
                    for k, _ in enumerate(stream):
                        if k >= rng.randint(0, 6):
                            break
                    stream.close()
                    self.ok("chat stream cut")
                elif op < 0.5:
                    client.completions.create(model=model, prompt=self.prompt(rng), max_tokens=rng.randint(1, 12),
                                              n=2, best_of=3, logprobs=2, temperature=1)
                    self.ok("n of best_of")
                elif op < 0.6:
                    client.completions.create(model=model, prompt=self.prompt(rng), max_tokens=6,
                                              extra_body={"use_beam_search": True, "n": 2})
                    self.ok("beam search")
                elif op < 0.75:
                    client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "json"}], max_tokens=24,
                        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}})
                    self.ok("json schema")
                elif op < 0.9:
                    r = client.responses.create(model=model, input=self.prompt(rng), max_output_tokens=12,
                                                background=True, store=True)
                    if rng.random() < 0.5:
                        client.responses.cancel(r.id)
                    self.ok("background response")
                else:
                    stream = client.responses.create(model=model, input=self.prompt(rng), max_output_tokens=12,
                                                     stream=True)
                    for k, _ in enumerate(stream):
                        if k >= rng.randint(0, 6):
                            break
                    stream.close()
                    self.ok("response stream cut")
            except openai.APIStatusError as e:
                if e.status_code >= 500:
                    with self.lock:
                        self.wrong.append((e.status_code, str(e)[:300]))
            except openai.APIConnectionError as e:
                with self.lock:
                    self.wrong.append(("connection", str(e)[:300]))


def test_a_mixed_load_leaves_the_server_exact_and_idle(soak_server, tiny_adapters):
    """Unary, streamed and cancelled requests, sums of adapters, deadlines, runtime registrations
    over gRPC; streamed and cut chats, n/best_of, beam search, JSON schemas and the Responses API
    (background, cancelled, streamed and cut) over HTTP; all at once. Every answer is a success or
    a client-side status; the canary's outputs never change; afterwards no request, KV block,
    adapter pin or response is held, and the log has no traceback."""
    soak_server.model_name = soak_server.client.server_info().model
    load = Load(soak_server, sorted(tiny_adapters), SOAK_SECONDS)
    with Canary(soak_server) as canary:
        load.run([load.grpc_worker] * 4 + [load.http_worker] * 3)
    assert load.wrong == []
    kinds = {"generate", "stream cut", "combine", "register", "unregister", "chat stream cut", "n of best_of",
             "beam search", "json schema", "background response", "response stream cut"}
    assert kinds <= set(load.done), f"kinds that never succeeded: {kinds - set(load.done)} ({load.done})"
    assert_recovered(soak_server, canary)
    deadline = time.monotonic() + 10
    while soak_server.metrics()["loramux_responses_in_progress"] != 0:  # cancelled background responses settle
        assert time.monotonic() < deadline, "background responses still in progress"
        time.sleep(0.05)
    assert "Traceback" not in soak_server.log()
