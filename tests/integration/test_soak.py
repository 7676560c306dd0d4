"""Soaks: mixed concurrent load through both APIs against a real server (one whose small tiers
force paging, preemption and speculative drafts; one with fair scheduling, the C++ ops and a small
registry that dynamic and per-request adapters churn), while the canary's greedy requests must keep
their outputs. Afterwards nothing may be held and the log may hold no traceback."""

import os
import random
import shutil
import threading
import time
from collections import Counter

import grpc
import openai
import pytest

try:
    import httpx2 as httpx
except ImportError:
    import httpx

from loramux.clients.types import Sampling
from loramux.server.ops.cpu_kernel import load_kernels

from helpers import pinned_base_linear
from server import ServerProcess
from test_reliability import Canary, assert_recovered

# A short soak keeps `make test` short; LORAMUX_SOAK_SECONDS runs a longer one.
SOAK_SECONDS = float(os.environ.get("LORAMUX_SOAK_SECONDS", "6"))
# The C++ ops where they are built (a host without a compiler, or LORAMUX_NO_CPU_KERNEL=1, serves
# the torch ops, and `--op-backend cpp` would be a start-up error there).
OPS = "cpp" if load_kernels() is not None else "torch"
CLIENT_STATUSES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                   grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
WORDS = ("alpha", "beta", "gamma", "delta", "the", "a")
PREFIX = "a shared preamble that many requests start with, so their KV blocks are reused: "
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def started(tiny_llama, tiny_adapters, tmp_path_factory, prefix: str, args: list[str]):
    """A server over the tiny adapters (--adapter-dir) with an adapter root holding copies of two of
    them as PREFIX-attn-r4 and PREFIX-layer1-r4 (PREFIX empty: their own names)."""
    root = tmp_path_factory.mktemp("soak-root")
    for name in ("attn-r4", "layer1-r4"):
        shutil.copytree(tiny_adapters[name], root / f"{prefix}{name}")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-dir", str(next(iter(tiny_adapters.values())).parent),
         "--adapter-root", str(root), "--allow-runtime-adapters", "--max-model-len", "256",
         "--default-max-new-tokens", "16", "--max-queued-requests", "64", *args],
        tmp_path_factory.mktemp("soak-logs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    return proc


@pytest.fixture(scope="module")
def soak_server(tiny_llama, tiny_adapters, tmp_path_factory):
    """Small tiers and KV cache, so requests page adapters and are preempted; drafts; priorities.
    Runtime registrations re-register the root's copies."""
    proc = started(tiny_llama, tiny_adapters, tmp_path_factory, "", [
        "--scheduling", "priority", "--max-batch-size", "8", "--kv-cache-tokens", "512",
        "--max-tokens-per-step", "64", "--max-device-adapters", "3", "--max-host-adapters", "5",
        "--num-speculative-tokens", "2", "--prompt-lookup-min", "1"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def features_server(tiny_llama, tiny_adapters, tmp_path_factory):
    """Fair scheduling with a kept adapter, per-request and dynamic registrations (dyn-*) that churn
    a small registry, the C++ ops and base kernel (where built), the converted-adapter cache and tool calls."""
    proc = started(tiny_llama, tiny_adapters, tmp_path_factory, "dyn-", [
        "--dynamic-adapters", "--scheduling", "fair", "--keep-resident", "attn-r4",
        "--adapter-cache-dir", str(tmp_path_factory.mktemp("soak-cache")), "--op-backend", OPS,
        "--base-linear", pinned_base_linear(OPS), "--tool-call-parser", "hermes", "--max-registered-adapters", "14",
        "--max-batch-size", "6", "--kv-cache-tokens", "768", "--max-tokens-per-step", "48",
        "--max-device-adapters", "3", "--max-host-adapters", "4", "--max-adapters-per-step", "2"])
    yield proc
    proc.stop()


class Load:
    """Worker threads that each run random operations for ``seconds``, and on (at most a minute)
    until each of ``kinds`` has succeeded, so that a slow machine still tries every kind; ``done``
    counts each kind that succeeded, ``wrong`` keeps every answer that is no client-side status."""

    def __init__(self, server, adapters: list[str], seconds: float, kinds: set[str]):
        self.server, self.adapters, self.kinds = server, adapters, kinds
        self.stop = time.monotonic() + seconds
        self.done: dict[str, int] = {}
        self.wrong: list = []
        self.refusals: list = []  # client-side statuses: expected, but each kept to be read on a failure
        self.lock = threading.Lock()

    def going(self) -> bool:
        now = time.monotonic()
        with self.lock:
            return now < self.stop or (now < self.stop + 60 and not self.kinds <= set(self.done))

    def ok(self, kind: str) -> None:
        with self.lock:
            self.done[kind] = self.done.get(kind, 0) + 1

    def answered(self, status, details: str, client_side: bool) -> None:
        with self.lock:
            (self.refusals if client_side else self.wrong).append((status, details[:300]))

    def run(self, workers: list) -> None:
        threads = [threading.Thread(target=w, args=(seed,)) for seed, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # What a long soak did, for `pytest -s` (refusals grouped by status and the start of the message)
        print(f"done: {self.done}")
        print(f"refused: {Counter((status, details[:70]) for status, details in self.refusals).most_common(12)}")

    @staticmethod
    def cut(stream, rng, most: int) -> None:
        """Read chunks until a random draw (at most ``most``) says stop, then close the stream, which
        cancels its request if it is not done."""
        for k, _ in enumerate(stream):
            if k >= rng.randint(0, most):
                break
        stream.close()

    @staticmethod
    def prompt(rng) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 8, 20, 40])))

    def adapter(self, rng) -> str:
        return rng.choice(["", *self.adapters, "rt0", "rt1", "missing"])

    def grpc_worker(self, seed: int) -> None:
        rng, client = random.Random(seed), self.server.client
        while self.going():
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
                    self.cut(stream, rng, 4)
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
                self.answered(e.code(), e.details() or "", e.code() in CLIENT_STATUSES)

    def http_worker(self, seed: int) -> None:
        rng, client = random.Random(1000 + seed), self.server.openai()
        while self.going():
            model, op = self.adapter(rng) or self.server.model_name, rng.random()
            try:
                if op < 0.3:
                    stream = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": self.prompt(rng)}], stream=True,
                        max_tokens=rng.randint(1, 20), temperature=rng.choice([0, 1]))
                    self.cut(stream, rng, 6)
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
                    self.cut(stream, rng, 6)
                    self.ok("response stream cut")
            except openai.APIStatusError as e:
                self.answered(e.status_code, str(e), e.status_code < 500)
            except openai.APIConnectionError as e:
                self.answered("connection", str(e), False)

    def features_grpc_worker(self, seed: int) -> None:
        rng, client = random.Random(2000 + seed), self.server.client
        while self.going():
            op = rng.random()
            sampling = Sampling(
                max_new_tokens=rng.randint(1, 16), temperature=rng.choice([None, 0.7]), seed=rng.randint(0, 9),
                top_k=rng.choice([None, 5]), top_p=rng.choice([None, 0.9]), min_p=rng.choice([None, 0.05]),
                repetition_penalty=rng.choice([None, 1.2]), presence_penalty=rng.choice([None, 0.5]),
                stop=rng.choice([[], ["the"]]), logit_bias=rng.choice([{}, {5: 3.0}]),
                min_new_tokens=rng.choice([None, 1]), prompt_logprobs=rng.choice([None, 1]),
                bad_words=rng.choice([[], ["alpha"]]), choice=rng.choice([None, None, ["yes", "no"]]))
            adapter = rng.choice(["", "attn-r4", "all-r8", "regex-mlp-r8", "dyn-attn-r4", "dyn-layer1-r4", "rt0"])
            try:
                if op < 0.4:
                    prompt = PREFIX + self.prompt(rng) if rng.random() < 0.5 else self.prompt(rng)
                    client.generate(prompt, adapter_id=adapter, sampling=sampling, timeout=60)
                    self.ok("sampling extras")
                elif op < 0.55:
                    parts = rng.sample(["attn-r4", "layer1-r4", "dyn-attn-r4", "all-r8"], 2)
                    client.generate(self.prompt(rng), combine=[(p, rng.choice([0.25, 0.5, -1.0])) for p in parts],
                                    sampling=sampling, timeout=60)
                    self.ok("per-request sum")
                elif op < 0.7:
                    client.register_adapter("rt0", str(self.server.root / "dyn-attn-r4"), replace=True,
                                            weight=rng.choice([None, 0.5, 4.0]),
                                            keep_resident=rng.random() < 0.3, timeout=60)
                    self.ok("register weighted")
                elif op < 0.8:
                    stream = client.generate_stream(PREFIX + self.prompt(rng), adapter_id=adapter, sampling=sampling,
                                                    timeout=60)
                    self.cut(stream, rng, 3)
                    self.ok("stream cut")
                elif op < 0.9:
                    ids = client.tokenize(self.prompt(rng), adapter_id=adapter, timeout=60).token_ids
                    client.detokenize(ids, adapter_id=adapter, timeout=60)
                    self.ok("tokenize")
                else:
                    client.list_adapters(timeout=60)
                    client.server_info(timeout=60)
                    self.ok("list")
            except grpc.RpcError as e:
                self.answered(e.code(), e.details() or "", e.code() in CLIENT_STATUSES)

    def features_http_worker(self, seed: int) -> None:
        rng, client = random.Random(3000 + seed), self.server.openai()
        url = self.server.base_url
        while self.going():
            model = rng.choice([self.server.model_name, "attn-r4", "all-r8", "dyn-layer1-r4", "rt1"])
            op = rng.random()
            messages = [{"role": "user", "content": "Weather in " + self.prompt(rng)}]
            try:
                if op < 0.3:
                    named = {"type": "function", "function": {"name": "weather"}}
                    ask = dict(model=model, messages=messages, tools=[WEATHER], max_tokens=rng.randint(4, 40),
                               tool_choice=rng.choice(["auto", "required", named]), temperature=rng.choice([0, 1]))
                    if rng.random() < 0.5:
                        stream = client.chat.completions.create(**ask, stream=True)
                        self.cut(stream, rng, 30)
                    else:
                        client.chat.completions.create(**ask)
                    self.ok("tools")
                elif op < 0.5:
                    stream = client.completions.create(
                        model=model, prompt=PREFIX + self.prompt(rng), max_tokens=rng.randint(1, 12), echo=True,
                        stop=[" the"], logit_bias={"7": 2}, seed=rng.randint(0, 9), temperature=1, n=2, stream=True,
                        stream_options={"include_usage": True}, frequency_penalty=0.5)
                    list(stream)
                    self.ok("completion extras")
                elif op < 0.65:
                    first = client.responses.create(model=model, input=self.prompt(rng), max_output_tokens=8,
                                                    store=True)
                    client.responses.create(model=model, input=self.prompt(rng), max_output_tokens=8,
                                            previous_response_id=first.id)
                    if rng.random() < 0.5:
                        client.responses.delete(first.id)
                    self.ok("response chain")
                elif op < 0.8:
                    if rng.random() < 0.5:
                        body = {"lora_name": "rt1", "lora_path": str(self.server.root / "dyn-layer1-r4")}
                        r = httpx.post(f"{url}/load_lora_adapter", json=body, timeout=60)
                    else:
                        r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "rt1"}, timeout=60)
                    if r.status_code >= 400:
                        self.answered(r.status_code, r.text, r.status_code < 500)
                    else:
                        self.ok("http load/unload")
                else:
                    client.chat.completions.create(
                        model=self.server.model_name, messages=messages, max_tokens=8, response_format={
                            "type": "json_object"},
                        extra_body={"combine": [{"adapter_id": "attn-r4", "weight": rng.choice([0.5, 2.0])},
                                                {"adapter_id": "dyn-layer1-r4", "weight": 1.0}]})
                    self.ok("chat sum json")
            except openai.APIStatusError as e:
                self.answered(e.status_code, str(e), e.status_code < 500)
            except openai.APIConnectionError as e:
                self.answered("connection", str(e), False)


def soak(server, adapters: list[str], workers, kinds: set[str]) -> None:
    """Run ``workers(load)`` for SOAK_SECONDS beside the canary; then every answer must have been a
    success or a client-side status, each of ``kinds`` must have succeeded, the canary's outputs
    never changed, no request, KV block, adapter pin or response may be held, and the log may hold
    no traceback."""
    server.model_name = server.client.server_info().model
    load = Load(server, adapters, SOAK_SECONDS, kinds)
    with Canary(server) as canary:
        load.run(workers(load))
    assert load.wrong == []
    assert kinds <= set(load.done), f"kinds that never succeeded: {kinds - set(load.done)} ({load.done})"
    assert_recovered(server, canary)
    deadline = time.monotonic() + 10
    while server.metrics()["loramux_responses_in_progress"] != 0:  # cancelled background responses settle
        assert time.monotonic() < deadline, "background responses still in progress"
        time.sleep(0.05)
    assert "Traceback" not in server.log()


@pytest.mark.timeout(SOAK_SECONDS + 300)  # start-up, the canary and the checks on top of the soak itself
def test_a_mixed_load_leaves_the_server_exact_and_idle(soak_server, tiny_adapters):
    """Unary, streamed and cancelled requests, sums of adapters, deadlines, runtime registrations
    over gRPC; streamed and cut chats, n/best_of, beam search, JSON schemas and the Responses API
    (background, cancelled, streamed and cut) over HTTP; all at once."""
    soak(soak_server, sorted(tiny_adapters), lambda load: [load.grpc_worker] * 4 + [load.http_worker] * 3,
         {"generate", "stream cut", "combine", "register", "unregister", "chat stream cut", "n of best_of",
          "beam search", "json schema", "background response", "response stream cut"})


@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_a_second_mix_of_features_leaves_the_server_exact_and_idle(features_server, tiny_adapters):
    """Sampling extras, shared prefixes, per-request sums and dynamic registrations churning a
    registry of 14, weighted and kept registrations over gRPC; tool calls (auto, required, named;
    streamed and cut), echoed and streamed completions, Responses chains and the HTTP load routes
    over HTTP; under fair scheduling, the C++ ops and the converted-adapter cache."""
    soak(features_server, sorted(tiny_adapters),
         lambda load: [load.features_grpc_worker] * 4 + [load.features_http_worker] * 3,
         {"sampling extras", "per-request sum", "register weighted", "stream cut", "tokenize", "list", "tools",
          "completion extras", "response chain", "http load/unload", "chat sum json"})
