"""Hardening against the real server: no request and no adapter file takes it down, stalls it, or
gets past its limits. Every test runs the canary loop (test_reliability.Canary) and checks that
the server is idle, exact and SERVING afterwards."""

import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loramux.clients.bench import free_port
from loramux.clients.client import LoraMuxClient
from loramux.clients.types import Sampling
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

from server import ServerProcess
from test_grpc import PROMPT_IDS, code_of
from test_reliability import SERVING, Canary, assert_recovered

# A fixed example budget keeps `make test` short; LORAMUX_FUZZ_EXAMPLES runs a longer campaign.
FUZZ_EXAMPLES = int(os.environ.get("LORAMUX_FUZZ_EXAMPLES", "100"))
F32_MAX = float(torch.finfo(torch.float32).max)
MAX_REGISTERED = 5  # the canary's two adapters, and room for three more


@pytest.fixture(scope="module")
def hserver(tiny_llama, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("hroot")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter", f"attn-r4={tiny_adapters['attn-r4']}",
         "--adapter", f"all-r8={tiny_adapters['all-r8']}", "--adapter-root", str(root), "--allow-runtime-adapters",
         "--max-batch-size", "8", "--max-model-len", "128", "--max-input-tokens", "40", "--max-total-tokens", "60",
         "--max-new-tokens-limit", "30", "--default-max-new-tokens", "8", "--max-stop-token-ids", "4",
         "--max-prompt-bytes", "1500000", "--max-chat-messages", "3", "--tool-call-parser", "hermes",
         "--max-registered-adapters", str(MAX_REGISTERED),
         "--scheduling", "priority"],  # fuzzed priorities preempt the canary and one another
        tmp_path_factory.mktemp("hlogs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    yield proc
    proc.stop()


def adapter_copy(server, tiny_adapters, name, source="attn-r4"):
    path = server.root / name
    if path.exists():
        shutil.rmtree(path)
    return shutil.copytree(tiny_adapters[source], path)


def edit_config(path, **change):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(change)
    (path / "adapter_config.json").write_text(json.dumps(cfg))  # NaN and Infinity as Python's json writes them


# ---- per-request isolation and numerically safe sampling ----

EXTREME_SAMPLING = [
    dict(temperature=1e-39), dict(temperature=1e-45), dict(temperature=1.1754944e-38),
    dict(temperature=1e-5), dict(temperature=100.0),
    dict(temperature=0.7, repetition_penalty=1e-45), dict(temperature=0.7, repetition_penalty=F32_MAX),
    dict(repetition_penalty=1e-45), dict(repetition_penalty=F32_MAX),
    dict(temperature=1.0, top_p=1e-45), dict(temperature=1.0, top_k=2**32 - 1),
    dict(temperature=1e-38, top_p=1e-45, top_k=1, repetition_penalty=3e38, seed=2**64 - 1),
    dict(presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=F32_MAX, logit_bias={0: 100.0, 383: -100.0}),
    dict(temperature=1.0, presence_penalty=-2.0, frequency_penalty=-2.0, logit_bias={i: 100.0 for i in range(300)}),
    dict(temperature=100.0, min_p=1.0), dict(temperature=1e-5, min_p=1e-45, top_p=1e-45),
    dict(temperature=1.0, min_p=0.999999, top_k=2, logit_bias={i: 100.0 for i in range(300)}),
]


@pytest.mark.parametrize("adapter", ["", "attn-r4"])
def test_extreme_sampling_values_are_served(hserver, adapter):
    with Canary(hserver) as canary:
        for values in EXTREME_SAMPLING:
            got = hserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter,
                                          sampling=Sampling(max_new_tokens=4, ignore_eos=True, **values))
            assert got.completion_tokens == 4, values
            assert all(0 <= t < 384 for t in got.token_ids)
    assert_recovered(hserver, canary)


@pytest.mark.parametrize("field, value", [
    ("lora_alpha", math.nan), ("lora_alpha", math.inf), ("lora_alpha", -math.inf), ("r", math.nan),
    ("alpha_pattern", {"q_proj": math.inf}), ("rank_pattern", {"v_proj": math.nan}), ("r", 100000),
    ("lora_alpha", "16"), ("use_rslora", "yes"), ("r", True),
])
def test_non_finite_wrong_typed_or_mismatched_config_values_are_refused(hserver, tiny_adapters, field, value):
    path = adapter_copy(hserver, tiny_adapters, "cfg")
    edit_config(path, **{field: value})
    with Canary(hserver) as canary:
        code, details = code_of(hserver.client.register_adapter, "cfg", str(path))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and (f"'{field}'" if field == "r" else field) in details, details
    assert_recovered(hserver, canary)


@pytest.mark.parametrize("alpha, status, needle", [
    (1e308, grpc.StatusCode.FAILED_PRECONDITION, "Inf"),  # infinite once folded into the weights: refused at load
    (3e38, grpc.StatusCode.INTERNAL, "non-finite logits"),  # finite weights (rank 4) that overflow the forward pass
])
def test_a_huge_finite_alpha_fails_its_requests_alone(hserver, tiny_adapters, alpha, status, needle):
    """Finite in the file, too large once served: each request fails alone, its error naming the adapter."""
    path = adapter_copy(hserver, tiny_adapters, "huge-alpha")
    edit_config(path, lora_alpha=alpha)
    hserver.client.register_adapter("huge-alpha", str(path))
    try:
        with Canary(hserver) as canary:
            code, details = code_of(hserver.client.generate, prompt_token_ids=PROMPT_IDS, adapter_id="huge-alpha")
        assert code == status and needle in details and "huge-alpha" in details, details
    finally:
        hserver.client.unregister_adapter("huge-alpha")
    assert_recovered(hserver, canary)


# ---- bounded inputs ----

def test_input_limits_are_named(hserver):
    with Canary(hserver) as canary:
        for kwargs, needle in [
            (dict(prompt="x", sampling=Sampling(stop_token_ids=[1, 2, 3, 4, 5])), "--max-stop-token-ids"),
            (dict(prompt="é" * 750_001), "--max-prompt-bytes"),
            (dict(messages=[("user", "hi")] * 4), "--max-chat-messages"),
            (dict(messages=[("user", "x" * 800_000), ("user", "y" * 800_000)]), "--max-prompt-bytes"),
            (dict(prompt_token_ids=[7] * 41), "max_input_tokens is 40"),
            (dict(prompt="hi", request_id="two\nlines"), "request_id"),
            (dict(prompt="hi", request_id="bell\x07"), "request_id"),
            (dict(prompt="hi", request_id="r" * 129), "the limit is 128"),
        ]:
            code, details = code_of(hserver.client.generate, **kwargs)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, (needle, details)
            assert len(details) < 300
    assert_recovered(hserver, canary)


def test_error_details_echo_only_a_short_form_of_client_input(hserver):
    with Canary(hserver) as canary:
        for kwargs in [dict(prompt_token_ids=PROMPT_IDS, adapter_id="z" * 100_000),
                       dict(messages=[("r" * 100_000, "hi")]),
                       dict(prompt_token_ids=PROMPT_IDS, request_id="\n" * 100)]:
            code, details = code_of(hserver.client.generate, **kwargs)
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
            assert len(details) < 300, len(details)
        code, details = code_of(hserver.client.register_adapter, "q" * 100_000, str(hserver.root))
        assert len(details) < 300
    assert_recovered(hserver, canary)


def test_metrics_labels_come_only_from_registered_adapters(hserver):
    with Canary(hserver) as canary:
        for status_kwargs in [dict(sampling=Sampling(temperature=-1.0)), dict(prompt_token_ids=[7] * 41),
                              dict()]:
            kwargs = {"prompt_token_ids": PROMPT_IDS, **status_kwargs}
            code_of(hserver.client.generate, adapter_id="ghost-label", **kwargs)
    text = "\n".join(hserver.metrics())
    assert "ghost-label" not in text
    assert 'adapter="other"' in text
    assert_recovered(hserver, canary)


def test_the_registry_has_a_maximum_size(hserver, tiny_adapters):
    with Canary(hserver) as canary:
        names = [f"fill{i}" for i in range(MAX_REGISTERED - 2)]
        try:
            for name in names:
                hserver.client.register_adapter(name, str(adapter_copy(hserver, tiny_adapters, name)))
            code, details = code_of(hserver.client.register_adapter, "one-more",
                                    str(adapter_copy(hserver, tiny_adapters, "one-more")))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-registered-adapters is 5" in details
            hserver.client.register_adapter(names[0], str(hserver.root / names[0]), replace=True)  # a replace fits
        finally:
            for name in names:
                hserver.client.unregister_adapter(name)
    assert_recovered(hserver, canary)


# ---- adapter files are read safely ----

def test_adapter_files_that_escape_the_root_or_are_not_regular_are_refused(hserver, tiny_adapters, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text((tiny_adapters["attn-r4"] / "adapter_config.json").read_text())
    cases = {}
    link = adapter_copy(hserver, tiny_adapters, "link-out")
    (link / "adapter_config.json").unlink()
    (link / "adapter_config.json").symlink_to(outside)
    cases["link-out"] = (link, grpc.StatusCode.PERMISSION_DENIED, "outside the adapter root")
    zero = adapter_copy(hserver, tiny_adapters, "dev-zero")
    (zero / "adapter_model.safetensors").unlink()
    (zero / "adapter_model.safetensors").symlink_to("/dev/zero")
    cases["dev-zero"] = (zero, grpc.StatusCode.PERMISSION_DENIED, "outside the adapter root")
    fifo = adapter_copy(hserver, tiny_adapters, "fifo")
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")
    cases["fifo"] = (fifo, grpc.StatusCode.FAILED_PRECONDITION, "not a regular file")
    big = adapter_copy(hserver, tiny_adapters, "big-config")
    edit_config(big, padding="x" * (1 << 20))
    cases["big-config"] = (big, grpc.StatusCode.FAILED_PRECONDITION, "1048576 bytes")
    trailing = adapter_copy(hserver, tiny_adapters, "trailing")
    with open(trailing / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    cases["trailing"] = (trailing, grpc.StatusCode.FAILED_PRECONDITION, "trailing bytes")
    a_file = hserver.root / "a-file"
    a_file.write_text("{}")
    cases["a-file"] = (a_file, grpc.StatusCode.FAILED_PRECONDITION, "not a directory")
    with Canary(hserver) as canary:
        for name, (path, status, needle) in cases.items():
            t0 = time.monotonic()
            code, details = code_of(hserver.client.register_adapter, name, str(path), timeout=20)
            assert (code, name) == (status, name) and needle in details, (name, details)
            assert time.monotonic() - t0 < 5, name  # refused at once: nothing blocks on the FIFO
    assert_recovered(hserver, canary)


def _header_edit(path, edit):
    data = (path / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _first_tensor(h):
    return next(v for k, v in h.items() if k != "__metadata__")


@pytest.mark.parametrize("name, edit", [
    ("offsets-strings", lambda h: _first_tensor(h).update(data_offsets=["0", "a"])),
    ("offsets-three", lambda h: _first_tensor(h).update(data_offsets=[0, 1, 2])),
    ("dtype-list", lambda h: _first_tensor(h).update(dtype=["F32"])),
    ("dtype-unknown", lambda h: _first_tensor(h).update(dtype="I64")),
    ("shape-negative", lambda h: _first_tensor(h).update(shape=[-4, 64])),
    ("entry-not-object", lambda h: h.update({"base_model.model.x.lora_A.weight": 7})),
])
def test_malformed_safetensors_headers_are_failed_precondition(hserver, tiny_adapters, name, edit):
    path = adapter_copy(hserver, tiny_adapters, name)
    _header_edit(path, edit)
    with Canary(hserver) as canary:
        code, details = code_of(hserver.client.register_adapter, name, str(path))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert_recovered(hserver, canary)


@pytest.mark.parametrize("field, pattern, refused", [
    # exponential backtracking for Python's re on a 30-character module name; linear for RE2
    ("target_modules", "(.|.)*Z", "matches no supported module"),
    ("rank_pattern", "(.|.)*(.|.)*Z", None),  # a key that matches no module: served at r
    ("target_modules", r"(q)\1_proj", "not supported by RE2"),  # no backreferences
    ("alpha_pattern", "(?=q)q_proj", "not supported by RE2"),  # nor lookahead
])
def test_regexes_are_matched_in_linear_time_or_refused(hserver, tiny_adapters, field, pattern, refused):
    path = adapter_copy(hserver, tiny_adapters, "regex")
    edit_config(path, **({field: pattern} if field == "target_modules" else {field: {pattern: 4}}))
    with Canary(hserver) as canary:
        t0 = time.monotonic()
        try:
            hserver.client.register_adapter("regex", str(path), timeout=20)
            code, details = grpc.StatusCode.OK, ""
            hserver.client.unregister_adapter("regex")
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        took = time.monotonic() - t0
    assert took < 5
    if refused:
        assert code == grpc.StatusCode.FAILED_PRECONDITION and field in details and refused in details, details
    else:
        assert code == grpc.StatusCode.OK
    assert_recovered(hserver, canary)


def test_weights_changed_after_registration_are_refused_until_registered_again(hserver, tiny_adapters):
    path = adapter_copy(hserver, tiny_adapters, "swap")
    hserver.client.register_adapter("swap", str(path))
    try:
        weights = load_file(path / "adapter_model.safetensors")
        save_file({k: -v for k, v in weights.items()}, path / "adapter_model.safetensors")  # same size, other values
        with Canary(hserver) as canary:
            code, details = code_of(hserver.client.generate, prompt_token_ids=PROMPT_IDS, adapter_id="swap")
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "register it again" in details
            hserver.client.register_adapter("swap", str(path), replace=True)
            greedy = Sampling(max_new_tokens=6, ignore_eos=True)
            assert hserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="swap",
                                           sampling=greedy).completion_tokens == 6
    finally:
        hserver.client.unregister_adapter("swap")
    assert_recovered(hserver, canary)


# ---- the event loop never blocks ----

def test_health_and_server_info_answer_while_a_huge_prompt_is_tokenized(hserver):
    prompt = ("The quick brown fox jumps over the lazy dog. Ünïcödé 東京 🚀 " * 30_000)[:1_200_000]
    assert len(prompt.encode()) < 1_500_000  # under --max-prompt-bytes: it really is tokenized
    errors = []

    def big():
        try:
            hserver.client.generate(prompt=prompt, timeout=60)
        except grpc.RpcError as e:
            errors.append(e.code())

    stub = pb_grpc.LoraMuxStub(hserver.channel)
    with Canary(hserver) as canary:
        worker = threading.Thread(target=big)
        worker.start()
        health, info = [], []
        while worker.is_alive():
            t0 = time.monotonic()
            assert hserver.health.Check(health_pb2.HealthCheckRequest(service="loramux.v1.LoraMux"),
                                        timeout=5).status == SERVING
            t1 = time.monotonic()
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
            health.append(t1 - t0)
            info.append(time.monotonic() - t1)
            time.sleep(0.02)
        worker.join()
    assert errors == [grpc.StatusCode.INVALID_ARGUMENT]  # tokenized, then longer than max_input_tokens
    assert len(health) >= 5  # the probes really overlapped the tokenizing
    # A loop blocked by the tokenizing would hold a probe for its whole duration (seconds); a
    # loaded 2-core CI machine can add a scheduling hiccup to any single probe, hence the medians.
    assert max(health) < 0.5 and max(info) < 0.5, (max(health), max(info))
    assert statistics.median(health) < 0.1 and statistics.median(info) < 0.1
    assert_recovered(hserver, canary)


def _serve_refused(args, env=None) -> tuple[int, str]:
    """`loramux serve` expected to refuse ``args`` (on free ports unless ``args`` name theirs):
    its status and stderr."""
    out = subprocess.run([sys.executable, "-m", "loramux.server.cli", "serve", "--port", "0", "--http-port", "0",
                          "--metrics-port", "0", *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    return out.returncode, out.stderr


def _critical(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CRITICAL" in line]


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_a_port_in_use_is_a_startup_error_naming_its_flags(tiny_llama, flag):
    """An operator's port that something else holds: the server exits with the bad-flag status and
    one line naming the address and the flags, not a traceback (the metrics port once failed only
    after the model had loaded, in prometheus-client's traceback)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        ports = {"--port": free_port(), "--http-port": free_port(), "--metrics-port": free_port(), flag: taken}
        code, err = _serve_refused(["--model", str(tiny_llama), "--host", "127.0.0.1",
                                    *(str(a) for kv in ports.items() for a in kv)])
    critical = _critical(err)
    assert code == 2 and len(critical) == 1, err
    assert f"127.0.0.1:{taken}" in critical[0] and flag in critical[0] and "in use" in critical[0], critical
    assert "Traceback" not in err, err
    assert "model_loader" not in err, err  # refused before the model loads (minutes, for a large one)


def test_a_host_name_that_does_not_resolve_is_a_startup_error_naming_its_flags(tiny_llama):
    """--host naming no address: the bad-flag status and one line naming the address, its flags and
    the resolver's answer (not grpc's own log line, nor "the port is in use")."""
    code, err = _serve_refused(["--model", str(tiny_llama), "--host", "nosuch.invalid"])
    critical = _critical(err)
    assert code == 2 and len(critical) == 1, err
    assert "cannot listen on nosuch.invalid:0 (--host, --port): " in critical[0] and "in use" not in critical[0], critical
    assert "add_port" not in err and "Traceback" not in err and "model_loader" not in err, err


def test_port_zero_serves_on_the_port_the_system_chose_and_says_which(tiny_llama, tmp_path):
    """--port 0: the system picks a free port (no race with another process for a port chosen
    beforehand); the log's "listening" and "ready" lines both name that port, and it serves."""
    from server import ForkedProcess

    log = tmp_path / "server.log"
    log.touch()
    proc = ForkedProcess(["serve", "--model", str(tiny_llama), "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
                          "--metrics-port", "0"], {**os.environ, "PYTHONUNBUFFERED": "1"}, log)
    try:
        deadline = time.monotonic() + 120
        while "ready: serving" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        named = re.findall(r"(?:listening on|ready: serving \S+ on) 127\.0\.0\.1:(\d+)", text)  # the two lines
        assert len(named) == 2 and len(set(named)) == 1 and int(named[0]) > 0, text
        with grpc.insecure_channel(f"127.0.0.1:{named[0]}") as channel:
            out = LoraMuxClient(channel=channel).generate(prompt_token_ids=PROMPT_IDS,
                                                     sampling=Sampling(max_new_tokens=3, ignore_eos=True))
        assert len(out.token_ids) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.mark.parametrize("flags", [["--adapter-dir", "not-there"], ["--adapter", "not-there"], ["--device", "cuda"]],
                         ids=lambda f: f[0])
def test_a_path_or_device_this_host_lacks_is_a_startup_error_before_the_model_loads(tiny_llama, tmp_path, flags):
    """An --adapter-dir or an --adapter that is not there, --device cuda in a CPU build of torch: the
    bad-flag status and one line naming the flag, before the model loads (each was found only once
    the model had loaded). tests/unit/test_config.py covers each such flag's message."""
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    value = {"--adapter-dir": str(tmp_path / flags[1]), "--adapter": f"x={tmp_path / flags[1]}"}.get(flags[0], flags[1])
    code, err = _serve_refused(["--model", str(tiny_llama), flags[0], value])
    critical = _critical(err)
    assert code == 2 and len(critical) == 1, err
    assert f"cannot start: {flags[0]} {value}: " in critical[0], critical
    assert "Traceback" not in err and "model_loader" not in err, err


def test_a_model_folder_transformers_cannot_read_fails_the_start_cleanly(tmp_path):
    """A load that fails for a reason of its own (a config.json that is not JSON): one CRITICAL line
    with transformers' message and its traceback, a non-zero status, and the front-ends stopped
    (not left to their finalizers after the event loop has closed)."""
    (tmp_path / "config.json").write_text("{not json")
    code, err = _serve_refused(["--model", str(tmp_path)])
    critical = _critical(err)
    assert code == 1 and len(critical) == 1, err
    assert "loading the model failed" in critical[0] and "not a valid JSON file" in critical[0], critical
    assert "Exception ignored" not in err and "Event loop is closed" not in err, err


@pytest.mark.parametrize(("flags", "message"), [
    (["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization sizes the KV pool on a CUDA device; this "
                                          "server runs on cpu: use --kv-cache-tokens"),
    (["--gpu-memory-utilization", "1.5"], "gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--gpu-memory-utilization", "0.5", "--kv-cache-tokens", "4096"], "set kv-cache-tokens or gpu-memory-utilization"),
])
def test_gpu_memory_utilization_misused_is_a_startup_error(tiny_llama, flags, message):
    """--gpu-memory-utilization on a CPU, out of range, or beside --kv-cache-tokens: the server exits
    with the bad-flag status and a message naming the flag, not a traceback, before it loads the
    model (a large model's load takes minutes)."""
    code, err = _serve_refused(["--model", str(tiny_llama), *flags])
    assert code == 2 and message in err, err
    assert "Traceback" not in err and "model_loader" not in err, err


def test_the_engine_dying_while_the_loop_is_busy_still_exits(tiny_llama, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--inject-fault", "fatal-busy:boom"], tmp_path / "log")
    try:
        proc.wait_ready()
        threading.Thread(target=lambda: code_of(proc.client.generate, prompt_token_ids=PROMPT_IDS, request_id="boom",
                                                timeout=60), daemon=True).start()
        assert proc.proc.wait(30) == 3  # the loop is blocked for 60 s: the watchdog, not the loop, exits
        assert "fatal engine error" in proc.log()
    finally:
        proc.stop()


# ---- adapter I/O faults, through the server ----

def _io_fault_server(tiny_llama, tiny_adapters, tmp_path, fault):
    proc = ServerProcess(["--model", str(tiny_llama), "--adapter", f"attn-r4={tiny_adapters['attn-r4']}",
                          "--adapter", f"all-r8={tiny_adapters['all-r8']}",
                          "--adapter", f"attn-r64={tiny_adapters['attn-r64']}", "--adapter-read-timeout", "1",
                          "--inject-fault", fault], tmp_path / "log")
    proc.wait_ready()
    return proc


def test_a_hung_disk_read_fails_its_requests_and_nothing_else(tiny_llama, tiny_adapters, tmp_path):
    proc = _io_fault_server(tiny_llama, tiny_adapters, tmp_path, "hang-read:attn-r64")
    try:
        with Canary(proc) as canary:
            t0 = time.monotonic()
            code, details = code_of(proc.client.generate, prompt_token_ids=PROMPT_IDS, adapter_id="attn-r64",
                                    timeout=30)
            assert time.monotonic() - t0 < 10
        assert code == grpc.StatusCode.UNAVAILABLE and "--adapter-read-timeout" in details
        assert "timed out" in proc.log()
        assert_recovered(proc, canary)
        proc.terminate()
        assert proc.proc.wait(30) == 0  # the hung read does not hold the exit
    finally:
        proc.stop()


def test_a_failed_device_copy_fails_its_requests_and_the_next_one_succeeds(tiny_llama, tiny_adapters, tmp_path):
    proc = _io_fault_server(tiny_llama, tiny_adapters, tmp_path, "copy-fail:attn-r64")
    try:
        with Canary(proc) as canary:
            code, details = code_of(proc.client.generate, prompt_token_ids=PROMPT_IDS, adapter_id="attn-r64",
                                    timeout=30)
            assert code == grpc.StatusCode.INTERNAL and "device copy failure" in details
            again = proc.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r64",
                                         sampling=Sampling(max_new_tokens=4, ignore_eos=True), timeout=30)
            assert again.completion_tokens == 4
        # the copy after the read, or a later one from the host tier: logged by the job that ran it
        assert re.search(r"I/O job (_read_into_host|_stage_copy) failed", proc.log())
        assert_recovered(proc, canary)
    finally:
        proc.stop()


# ---- auth and configuration ----

@pytest.mark.parametrize("args, env, needle", [
    (["--auth-token", ""], {}, "auth-token is empty"),
    ([], {"LORAMUX_ADMIN_TOKEN": ""}, "admin-token is empty"),
    ([], {"LORAMUX_AUTH_TOKEN": ""}, "LORAMUX_AUTH_TOKEN"),
    (["--allow-runtime-adapters", "--host", "0.0.0.0"], {}, "--insecure-admin"),
])
def test_unsafe_auth_settings_refuse_to_start(args, env, needle):
    code, err = _serve_refused(args, env)
    assert code == 2 and needle in err, err


def test_adapter_paths_are_shown_to_admin_callers_only(tiny_llama, tiny_adapters, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--auth-token", "user", "--admin-token", "admin",
                          "--adapter", f"attn-r4={tiny_adapters['attn-r4']}",
                          "--adapter", f"all-r8={tiny_adapters['all-r8']}"], tmp_path / "log")
    try:
        proc.wait_ready()
        user = LoraMuxClient(proc.target, token="user")
        admin = LoraMuxClient(proc.target, token="admin")
        with Canary(proc, token="user") as canary:
            assert {a.path for a in user.list_adapters()} == {""}
            assert {a.path for a in admin.list_adapters()} == {str(tiny_adapters[n].resolve())
                                                                for n in ("attn-r4", "all-r8")}
        assert canary.count > 0 and canary.failures == []
        # the token is checked before the request is parsed: bytes that do not parse, sent
        # without one, are refused for the token
        garbage = proc.channel.unary_unary("/loramux.v1.LoraMux/ListAdapters")
        with pytest.raises(grpc.RpcError) as e:
            garbage(b"\xff\xff\xff", timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            garbage(b"\xff\xff\xff", timeout=30, metadata=(("authorization", "Bearer user"),))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        proc.stop()


def test_a_local_server_without_runtime_registration_hides_paths(hserver, tiny_llama, tiny_adapters, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--adapter", f"attn-r4={tiny_adapters['attn-r4']}"],
                         tmp_path / "log")
    try:
        proc.wait_ready()
        assert [a.path for a in proc.client.list_adapters()] == [""]
    finally:
        proc.stop()
    # runtime registration on loopback without an admin token: every caller may register, so sees paths
    assert all(a.path for a in hserver.client.list_adapters())


# ---- streams and shutdown ----

def test_grpc_concurrency_is_bounded(tiny_llama, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--max-queued-requests", "2", "--max-concurrent-rpcs", "3"],
                         tmp_path / "log")
    try:
        proc.wait_ready()
        results = []

        def call():
            try:
                proc.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=60, ignore_eos=True))
                results.append("OK")
            except grpc.RpcError as e:
                results.append(e.details())

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "OK" in results and any("Concurrent RPC limit" in r for r in results), results
        assert proc.health_status() == SERVING
    finally:
        proc.stop()


def test_drain_waits_until_responses_are_delivered(tiny_llama, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--drain-timeout", "30"], tmp_path / "log")
    try:
        proc.wait_ready()
        stream = proc.client.generate_stream(prompt_token_ids=PROMPT_IDS,
                                             sampling=Sampling(max_new_tokens=40, ignore_eos=True))
        chunks = [next(stream)]
        proc.terminate()  # generation ends long before this slow reader has read it all
        for chunk in stream:
            chunks.append(chunk)
            time.sleep(0.1)
        assert len(chunks) == 40 and chunks[-1].finish_reason is not None
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()


# ---- model limits ----

def test_max_model_len_past_learned_positions_refuses_to_start(tmp_path):
    from helpers import build_family_model

    model = build_family_model("gpt2", tmp_path / "gpt2")  # n_positions = 512
    code, err = _serve_refused(["--model", str(model), "--max-model-len", "1024"])
    assert code == 2 and "--max-model-len 1024" in err and "512 positions" in err, err


# ---- the hypothesis campaigns ----

MAX_U32, MAX_U64 = 2**32 - 1, 2**64 - 1
any_float = st.one_of(st.none(), st.floats(width=32), st.sampled_from([0.0, 1e-45, 1e-39, F32_MAX, -F32_MAX,
                                                                       math.nan, math.inf, -math.inf]))
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
structured_pb = st.one_of(
    st.none(), st.just(pb.StructuredOutput()), st.just(pb.StructuredOutput(json_object=False)),
    st.builds(lambda v: pb.StructuredOutput(json_object=v), st.booleans()),
    st.builds(lambda v: pb.StructuredOutput(regex=v), st.one_of(odd_text, st.sampled_from(["[0-9]+", "(a*)*b", "(x"]))),
    st.builds(lambda v: pb.StructuredOutput(json_schema=v), st.one_of(odd_text, st.sampled_from(
        ['{"type": "object"}', '{"type": "string", "maxLength": 3}', '{"$ref": "#/nope"}', "[]"]),
        st.integers(65537, 70000).map(lambda n: "x" * n))),
    st.builds(lambda v: pb.StructuredOutput(choice=pb.ChoiceList(choices=v)), st.lists(odd_text, max_size=4)),
    st.builds(lambda v: pb.StructuredOutput(grammar=v), st.one_of(odd_text, st.just('start: "ab"+'))),
)
sampling_pb = st.builds(
    lambda mnt, t, p, k, rp, seed, stop, ids, ignore, pp, fp, bias, plp, minimum, so, mp, bw: pb.SamplingParams(
        **{k_: v for k_, v in dict(max_new_tokens=mnt, temperature=t, top_p=p, top_k=k, repetition_penalty=rp,
                                     seed=seed, presence_penalty=pp, frequency_penalty=fp,
                                     prompt_logprobs=plp, min_new_tokens=minimum, structured_output=so,
                                     min_p=mp).items()
           if v is not None},
        stop=stop, stop_token_ids=ids, ignore_eos=ignore, logit_bias=bias, bad_words=bw),
    st.one_of(st.none(), st.integers(0, MAX_U32)), any_float, any_float, st.one_of(st.none(), st.integers(0, MAX_U32)),
    any_float, st.one_of(st.none(), st.integers(0, MAX_U64)),
    st.one_of(st.lists(odd_text, max_size=6), st.lists(st.just("a"), min_size=100, max_size=300)),
    st.one_of(st.lists(st.integers(0, MAX_U32), max_size=6), st.lists(st.integers(0, 5), min_size=100, max_size=2000)),
    st.booleans(), any_float, any_float,
    st.one_of(st.dictionaries(st.integers(0, MAX_U32), st.floats(width=32), max_size=4),
              st.dictionaries(st.integers(0, 383), st.floats(-100, 100, width=32), min_size=290, max_size=320)),
    st.one_of(st.none(), st.integers(0, 20), st.integers(0, MAX_U32)),
    st.one_of(st.none(), st.integers(0, 20), st.integers(0, MAX_U32)),
    structured_pb,
    any_float,
    st.one_of(st.lists(odd_text, max_size=4), st.lists(st.just("ab"), min_size=120, max_size=140)),
)
prompt_options_pb = st.fixed_dictionaries({}, optional={  # GenerateRequest's rendering fields, and priority
    "add_generation_prompt": st.booleans(), "continue_final_message": st.booleans(), "add_special_tokens": st.booleans(),
    "truncate_prompt_tokens": st.one_of(st.integers(-3, 300), st.integers(-(2**31), 2**31 - 1)),
    "priority": st.one_of(st.integers(-3, 3), st.integers(-(2**31), 2**31 - 1)),
    "cache_salt": st.one_of(odd_text, st.just("s" * 257)),
    "chat_template_kwargs": st.one_of(odd_text, st.sampled_from(['{"preamble": "x"}', '{"tokenize": false}', "[]",
                                                                 "{", '{"a": ' * 3000 + "1" + "}" * 3000])),
    "documents": st.one_of(odd_text, st.sampled_from(['[{"text": "x"}]', '[{"t": 1}]', "{}", "[[]]"])),
    "chat_template": st.one_of(odd_text, st.sampled_from(["{% for m in messages %}{{ m.content }}{% endfor %}",
                                                          "{% if %}", "{{ raise_exception('no') }}"]))})
FUZZ_ADAPTERS = ["", "", "attn-r4", "all-r8", "nope", "../x"]
request_pb = st.builds(
    lambda rid, aid, combine, prompt, ids, msgs, s, chat: pb.GenerateRequest(
        request_id=rid, adapter_id=aid, combine=[pb.WeightedAdapter(adapter_id=a, weight=w) for a, w in combine],
        prompt=prompt, prompt_token_ids=ids, messages=[pb.ChatMessage(role=r, content=c) for r, c in msgs],
        sampling=s, **chat),
    st.one_of(odd_text, st.text(max_size=200)), st.sampled_from(FUZZ_ADAPTERS),
    st.lists(st.tuples(st.sampled_from(FUZZ_ADAPTERS), st.floats(width=32)), max_size=3),
    st.one_of(odd_text, st.text(max_size=4)), st.one_of(st.lists(st.integers(0, MAX_U32), max_size=50),
                                                      st.lists(st.integers(0, 383), min_size=5000, max_size=20000)),
    st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "robot", ""]), odd_text), max_size=5),
    sampling_pb,
    prompt_options_pb,
)


def test_fuzzed_requests_never_hurt_the_server(hserver):
    stub = pb_grpc.LoraMuxStub(hserver.channel)
    seen = set()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(req=request_pb)
    def check(req):
        try:
            stub.Generate(req, timeout=30)
            seen.add("OK")
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (e.code(), e.details())
            assert len(e.details()) < 1100
            seen.add(e.code())
        assert hserver.health_status() == SERVING

    with Canary(hserver) as canary:
        check()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    assert_recovered(hserver, canary)


# Requests valid in every field but the token ids of one, which span their type's range: the wide
# campaign above is refused at its first bad field, so it rarely reaches the step with several
# features on at once. Here min_new_tokens bans the stop ids under a structured output's mask (an id
# out of the vocabulary there once killed the engine: vllm#54195), beside biases, seeds and logprobs.
in_vocab, any_id = st.integers(0, 383), st.one_of(st.integers(0, 383), st.integers(384, MAX_U32))


@st.composite
def valid_requests(draw):
    wide = draw(st.sampled_from([None, "prompt", "stop", "allowed", "bias"]))  # the one field whose ids may be any

    def ids(field, **kw):
        return draw(st.lists(any_id if field == wide else in_vocab, **kw))

    structured = draw(st.sampled_from([None, pb.StructuredOutput(json_object=True),
                                       pb.StructuredOutput(regex="[a-z]{1,8}"),
                                       pb.StructuredOutput(choice=pb.ChoiceList(choices=["yes", "no"]))]))
    new = draw(st.integers(1, 6))
    logprobs = draw(st.one_of(st.none(), st.integers(0, 5)))
    sampling = pb.SamplingParams(
        max_new_tokens=new, min_new_tokens=draw(st.integers(0, new)), temperature=draw(st.sampled_from([0.0, 0.7, 1.5])),
        seed=draw(st.integers(0, MAX_U64)), stop_token_ids=ids("stop", max_size=3),
        allowed_token_ids=[] if structured is not None else ids("allowed", max_size=3),
        logit_bias={t: draw(st.floats(-100, 100, width=32)) for t in ids("bias", max_size=3)},
        structured_output=structured, **({} if logprobs is None else {"logprobs": logprobs}))
    return pb.GenerateRequest(adapter_id=draw(st.sampled_from(["", "attn-r4", "all-r8"])),
                              prompt_token_ids=ids("prompt", min_size=1, max_size=12), sampling=sampling)


def test_valid_requests_with_out_of_vocabulary_ids_never_hurt_the_server(hserver):
    stub = pb_grpc.LoraMuxStub(hserver.channel)
    seen = set()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(req=valid_requests())
    def check(req):
        try:
            stub.Generate(req, timeout=30)
            seen.add("OK")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary [0, 384)" in e.details(), \
                (e.code(), e.details())
            seen.add(e.code())
        assert hserver.health_status() == SERVING

    with Canary(hserver) as canary:
        check()
    assert seen == {"OK", grpc.StatusCode.INVALID_ARGUMENT}
    assert_recovered(hserver, canary)


schemas = st.one_of(
    st.sampled_from([{"type": "object"}, {"type": "objekt"}, {"type": "string", "pattern": "(a"}, {"$ref": "#/x"},
                     {"type": "array", "items": {"type": "integer"}, "minItems": 10**9}, {"enum": []}, True]),
    st.dictionaries(st.sampled_from(["type", "properties", "items", "anyOf", "pattern", "enum", "required"]),
                    st.one_of(odd_text, st.lists(odd_text, max_size=2), st.dictionaries(odd_text, st.just({}),
                                                                                          max_size=2)), max_size=3))


def http_bodies():
    """OpenAI completions and chat bodies: every field we read, in and out of range, of the wrong
    type, or null; small max_tokens keep the campaign short."""
    odd = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), odd_text)
    ids = st.lists(st.integers(-3, 400), max_size=6)
    common = {
        "model": st.sampled_from(["attn-r4", "all-r8", "nope", "../x", ""]),
        "max_tokens": st.one_of(st.integers(-2, 6), odd), "n": st.one_of(st.integers(-1, 3), st.just(200), odd),
        "temperature": st.one_of(st.floats(-1, 3), odd), "top_p": st.one_of(st.floats(0, 1), odd),
        "seed": st.one_of(st.integers(-(2**64), 2**65), odd), "stop": st.one_of(odd_text, st.lists(odd_text, max_size=5)),
        "stream": st.booleans(), "presence_penalty": st.one_of(st.floats(-3, 3), odd),
        "frequency_penalty": st.one_of(st.floats(-3, 3), odd),
        "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["0", "5", "x", "-1", "99999999", " 7"]),
                                                st.one_of(st.floats(), st.integers(-200, 200)), max_size=3), odd),
        "top_k": st.one_of(st.integers(-2, 50), odd), "repetition_penalty": st.one_of(st.floats(), odd),
        "combine": st.one_of(st.lists(st.fixed_dictionaries({"adapter_id": st.sampled_from(FUZZ_ADAPTERS),
                                                             "weight": st.one_of(st.floats(), odd)}), max_size=3),
                             odd),
        "min_p": st.one_of(st.floats(-1, 2), odd), "truncate_prompt_tokens": st.one_of(st.integers(-3, 300), odd),
        "priority": st.one_of(st.integers(-3, 3), st.integers(-(2**40), 2**40), odd),
        "cache_salt": st.one_of(odd_text, st.just("s" * 257), odd), "spaces_between_special_tokens": odd,
        "use_beam_search": st.one_of(st.booleans(), odd), "length_penalty": st.one_of(st.floats(), odd),
        "add_special_tokens": odd, "allowed_token_ids": st.one_of(ids, odd),
        "bad_words": st.one_of(st.lists(odd_text, max_size=4), st.just(["a"] * 129), odd),
        "prompt_logprobs": st.one_of(st.integers(-2, 22), odd), "return_tokens_as_token_ids": odd,
        "ignore_eos": st.one_of(st.booleans(), odd), "min_tokens": st.one_of(st.integers(-1, 8), odd),
        "stop_token_ids": st.one_of(ids, odd), "stream_options": st.one_of(st.just({"include_usage": True}), odd),
        "response_format": st.one_of(st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "xml"}]),
                                     st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.one_of(
                                         st.fixed_dictionaries({"schema": schemas}), odd)}), odd),
        "guided_regex": st.one_of(st.sampled_from(["[a-z]{1,3}", "(a|b", "(a*)*b", "\\", ".{0,99999}"]), odd),
        "guided_choice": st.one_of(st.lists(odd_text, max_size=3), odd),
        "guided_json": st.one_of(schemas, odd),
        "guided_grammar": st.one_of(st.sampled_from(['start: "x"+', "start: nope", "root ::= [0-9]+"]), odd),
        "structured_outputs": st.one_of(st.dictionaries(st.sampled_from(["json", "regex", "choice", "grammar",
                                                                         "json_object", "other"]), odd, max_size=2),
                                        odd),
    }
    completion = st.fixed_dictionaries({"prompt": st.one_of(odd_text, ids, st.lists(odd_text, max_size=3),
                                                            st.lists(ids, max_size=3), odd)}, optional={
        **common, "echo": st.one_of(st.booleans(), odd), "logprobs": st.one_of(st.integers(-1, 25), odd),
        "best_of": st.one_of(st.integers(-1, 3), odd), "suffix": st.one_of(odd_text, odd)})
    chat = st.fixed_dictionaries({"messages": st.one_of(st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "robot"]),
         "content": st.one_of(odd_text, st.none(), st.lists(st.fixed_dictionaries(
             {"type": st.sampled_from(["text", "image_url"]), "text": odd_text}), max_size=2))}), max_size=3), odd)},
        optional={**common, "logprobs": st.one_of(st.booleans(), odd), "top_logprobs": st.one_of(st.integers(-1, 25), odd),
                  "tools": st.one_of(st.just([{"type": "function"}]), st.just([{"type": "function", "function": {
                      "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]),
                                     st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": odd}),
                                              max_size=2), odd),
                  "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required",
                                                            {"type": "function", "function": {"name": "f"}}]), odd),
                  "add_generation_prompt": odd, "continue_final_message": odd, "echo": odd,
                  "best_of": st.one_of(st.integers(-1, 3), odd),
                  "prediction": st.one_of(st.fixed_dictionaries({
                      "type": st.sampled_from(["content", "diff"]), "content": st.one_of(odd_text, st.lists(
                          st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": odd_text}),
                          max_size=2), odd)}), odd),
                  "documents": st.one_of(st.lists(st.dictionaries(st.sampled_from(["title", "text"]), odd_text,
                                                                  max_size=2), max_size=2), odd),
                  "chat_template": st.one_of(st.sampled_from(["{{ messages[0].content }}", "{% if %}"]), odd),
                  "chat_template_kwargs": st.one_of(st.dictionaries(st.sampled_from(
                      ["preamble", "enable_thinking", "tokenize", "messages", "return_dict", "reasoning_effort"]), odd,
                      max_size=2), odd),
                  "reasoning_effort": st.one_of(st.sampled_from(["low", "high", "max"]), odd)})
    in_range = st.fixed_dictionaries({  # bodies that are served: the paths past validation get fuzzed too
        "model": st.sampled_from(["attn-r4", "all-r8"]), "prompt": st.lists(st.integers(1, 383), min_size=1, max_size=6),
        "max_tokens": st.integers(1, 5)}, optional={
        "n": st.integers(1, 3), "best_of": st.integers(1, 4), "temperature": st.floats(0, 2),
        "top_p": st.floats(0.05, 1), "stream": st.booleans(),
        "seed": st.integers(0, 2**64 - 1), "echo": st.booleans(), "logprobs": st.integers(0, 5),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "min_tokens": st.integers(0, 1),
        "logit_bias": st.dictionaries(st.sampled_from(["0", "5", "17"]), st.floats(-100, 100), max_size=2),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2), "top_k": st.integers(0, 40),
        "min_p": st.floats(0, 1), "allowed_token_ids": st.lists(st.integers(0, 383), min_size=1, max_size=5),
        "bad_words": st.lists(st.text(min_size=1, max_size=6).filter(str.strip), max_size=3),
        "prompt_logprobs": st.integers(0, 3), "return_tokens_as_token_ids": st.booleans(),
        "stream_options": st.just({"include_usage": True}),
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]),
        "guided_choice": st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
        "priority": st.integers(-2, 2), "cache_salt": st.sampled_from(["a", "b"]),
        "skip_special_tokens": st.booleans(), "spaces_between_special_tokens": st.booleans()})
    item = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "developer", "assistant", "tool", ""]),
                                            "content": st.one_of(odd_text, st.lists(st.fixed_dictionaries(
                                                {"type": st.sampled_from(["input_text", "output_text", "input_image"]),
                                                 "text": odd_text}), max_size=2), odd)},
                                           optional={"type": st.sampled_from(["message", "function_call_output"])}),
                     st.fixed_dictionaries({"type": st.just("function_call")}, optional={
                         "call_id": odd_text, "name": odd_text, "arguments": st.one_of(odd_text, odd)}),
                     st.fixed_dictionaries({"type": st.just("function_call_output")}, optional={
                         "call_id": odd_text, "output": st.one_of(odd_text, odd)}), odd)
    responses = st.fixed_dictionaries({"input": st.one_of(odd_text, st.lists(item, max_size=3), odd)}, optional={
        **common, "instructions": st.one_of(odd_text, odd), "max_output_tokens": st.one_of(st.integers(-2, 6), odd),
        "text": st.one_of(st.fixed_dictionaries({"format": st.one_of(st.sampled_from(
            [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "name": "n"}, {"type": "xml"}]),
            st.fixed_dictionaries({"type": st.just("json_schema"), "name": st.just("n"), "schema": schemas}), odd)}),
            odd),
        "truncation": st.one_of(st.sampled_from(["auto", "disabled"]), odd), "store": odd, "metadata": odd,
        "previous_response_id": odd,
        "reasoning": st.one_of(st.dictionaries(st.sampled_from(["effort", "summary", "budget"]),
                                               st.one_of(st.sampled_from(["low", "auto", "max"]), odd), max_size=2), odd), "top_logprobs": st.one_of(st.integers(-1, 22), odd),
        "background": st.one_of(st.booleans(), odd),
        "include": st.one_of(st.lists(st.sampled_from(["message.output_text.logprobs", "x"]), max_size=2), odd),
        "tools": st.one_of(st.just([]), st.just([{"type": "function", "name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}}}]), st.lists(odd, max_size=2), odd),
        "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", {"type": "function", "name": "f"},
                                                  {"type": "function"}]), odd)})
    beams = st.fixed_dictionaries({  # beam searches that are served
        "model": st.sampled_from(["attn-r4", "all-r8"]), "prompt": st.lists(st.integers(1, 383), min_size=1, max_size=6),
        "max_tokens": st.integers(1, 5), "use_beam_search": st.just(True)}, optional={
        "n": st.integers(1, 4), "length_penalty": st.floats(-1, 3), "logprobs": st.integers(0, 5),
        "ignore_eos": st.booleans(), "return_tokens_as_token_ids": st.booleans(), "priority": st.integers(-2, 2)})
    return st.one_of(st.tuples(st.just("completions"), completion), st.tuples(st.just("chat/completions"), chat),
                     st.tuples(st.just("completions"), in_range), st.tuples(st.just("responses"), responses),
                     st.tuples(st.just("completions"), beams))


def post_and_check(hserver, route: str, body: dict) -> int | None:
    """POST ``body`` to an OpenAI route: a 200 or a 4xx naming the problem, never a 5xx; a stream
    always ends with [DONE] (the Responses API: its response.completed event, or an error event)
    and carries no internal error; the server stays healthy. The status, or None for a body JSON
    cannot carry."""
    try:  # the HTTP client the installed openai package uses
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older openai releases use httpx
        import httpx

    try:
        payload = json.dumps(body, allow_nan=True)
    except (ValueError, OverflowError):
        return None
    r = httpx.post(f"{hserver.base_url}/{route}", content=payload, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code in (200, 400, 404, 413, 429), (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"]
    elif route == "responses" and r.headers["content-type"].startswith("text/event-stream"):
        last = r.text.rstrip().rsplit("\n\n", 1)[-1]  # its own last event (no [DONE] in this API)
        assert last.startswith(("event: response.completed", "event: error")) and '"code":"500"' not in r.text, \
            r.text[-300:]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"code":500' not in r.text, r.text[-300:]
    assert hserver.health_status() == SERVING
    return r.status_code


@st.composite
def valid_http_bodies(draw):
    """Completions and chat bodies valid in every field but, at most, one's token ids (which span
    any int), with several features on at once: choices, logprobs, echo, streams with usage, stops,
    min_tokens, structured outputs and tools."""
    wide = draw(st.sampled_from([None, "stop_token_ids", "allowed_token_ids", "logit_bias", "prompt"]))

    def ids(field, min_size=0, max_size=3):  # the wide field's hold one id at least
        return draw(st.lists(st.integers(-3, 2**40) if field == wide else in_vocab,
                             min_size=max(min_size, field == wide), max_size=max_size))

    body = {"model": draw(st.sampled_from(["attn-r4", "all-r8", "tiny-llama"])), "max_tokens": draw(st.integers(1, 5)),
            "temperature": draw(st.sampled_from([0.0, 0.8])), "seed": draw(st.integers(0, 2**31)),
            "stream": draw(st.booleans())}
    optional = {"n": st.integers(1, 3), "stop": st.lists(st.sampled_from(["a", "the", " ", "é"]), max_size=2),
                "stop_token_ids": st.just(ids("stop_token_ids")), "min_tokens": st.integers(0, 5),
                "allowed_token_ids": st.just(ids("allowed_token_ids", min_size=1, max_size=4)),
                "logit_bias": st.just({str(t): 5.0 for t in ids("logit_bias")}),
                "top_k": st.integers(0, 50), "presence_penalty": st.floats(-2, 2), "ignore_eos": st.booleans(),
                "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}])}
    for field, strategy in optional.items():
        if field == wide or draw(st.integers(0, 2)):  # two in three, and the wide one always
            body[field] = draw(strategy)
    if "allowed_token_ids" in body and body.get("response_format", {}).get("type") == "json_object":
        del body["allowed_token_ids"]  # refused together by design: not this campaign's subject
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    if draw(st.booleans()):
        body["prompt"] = ids("prompt", min_size=1, max_size=10) if draw(st.booleans()) else "the cat sat"
        if not body["stream"] and draw(st.booleans()):
            body.update(echo=True, logprobs=draw(st.integers(0, 3)))
        return "completions", body
    body["messages"] = [{"role": "user", "content": "weather in Rome?"}]
    if draw(st.booleans()):
        body.update(logprobs=True, top_logprobs=draw(st.integers(0, 3)))
    if draw(st.booleans()) and "response_format" not in body and "allowed_token_ids" not in body:
        body["tools"] = [{"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]
        body["tool_choice"] = draw(st.sampled_from(["none", "required", {"type": "function",
                                                                          "function": {"name": "weather"}}]))
    return "chat/completions", body


@pytest.mark.parametrize("bodies", [http_bodies, valid_http_bodies], ids=["any-fields", "one-odd-field"])
def test_fuzzed_http_bodies_never_hurt_the_server(hserver, bodies):
    seen = set()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=bodies())
    def check(case):
        seen.add(post_and_check(hserver, *case))

    with Canary(hserver) as canary:
        check()
    assert {200, 400} <= seen, seen  # served and refused bodies both
    assert_recovered(hserver, canary)


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.just(10**400),
              st.floats(), odd_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3), max_leaves=6)
number = st.one_of(st.integers(-5, 100_000), st.just(10**400), st.floats(), st.sampled_from([4, 8.0, 4.5]))
config_fields = st.fixed_dictionaries({}, optional={
    "peft_type": st.one_of(st.just("LORA"), json_value),
    "r": st.one_of(st.just(4), number, json_value),
    "lora_alpha": st.one_of(number, json_value),
    "target_modules": st.one_of(st.just(["q_proj", "v_proj"]), st.just(r".*\.(q|v)_proj"), json_value,
                                st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "lm_head"]), max_size=3)),
    "use_rslora": st.one_of(st.booleans(), json_value),
    "rank_pattern": st.one_of(st.dictionaries(st.sampled_from(["q_proj", "v_proj", "(.|.)*Z", "[", "x"]), number,
                                              max_size=2), json_value),
    "alpha_pattern": st.one_of(st.dictionaries(st.sampled_from(["q_proj", "v_proj", "(a)\\1"]), number, max_size=2),
                               json_value),
    "fan_in_fan_out": st.one_of(st.booleans(), json_value),
    "bias": st.one_of(st.just("none"), json_value),
    "use_dora": st.one_of(st.booleans(), json_value),
    "modules_to_save": st.one_of(json_value, st.lists(st.sampled_from(["lm_head", "embed_tokens", "norm"]),
                                                      max_size=2)),
    "ensure_weight_tying": st.one_of(st.booleans(), json_value),
    "trainable_token_indices": st.one_of(json_value, st.lists(st.integers(-2, 2**70), max_size=3)),
    "layers_to_transform": json_value,
    "base_model_name_or_path": json_value,
})


def served(server, name: str, path, seen: set, context) -> bool:
    """Register ``path`` as ``name``: whether it is served; a refusal must be FAILED_PRECONDITION.
    ``seen`` gathers "registered" and "refused"; ``context`` goes into a failure's message."""
    try:
        server.client.register_adapter(name, str(path))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.code(), e.details(), context)
        seen.add("refused")
        return False
    seen.add("registered")
    return True


def registration_campaign(server, check, seen: set) -> None:
    """Run ``check`` beside a canary: it must both serve and refuse some, and the server recover."""
    with Canary(server) as canary:
        check()
    assert seen == {"refused", "registered"}
    assert_recovered(server, canary)


def test_fuzzed_adapter_configs_never_hurt_the_server(hserver, tiny_adapters):
    base = json.loads((tiny_adapters["attn-r4"] / "adapter_config.json").read_text())
    seen = set()

    @settings(max_examples=max(20, FUZZ_EXAMPLES // 2), deadline=None, suppress_health_check=list(HealthCheck))
    @given(change=config_fields, drop=st.sets(st.sampled_from(["r", "lora_alpha", "target_modules"]), max_size=1))
    def check(change, drop):
        path = adapter_copy(hserver, tiny_adapters, "fuzz")
        cfg = {k: v for k, v in {**base, **change}.items() if k not in drop}
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        if served(hserver, "fuzz", path, seen, cfg):
            try:
                hserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="fuzz",
                                        sampling=Sampling(max_new_tokens=3, ignore_eos=True))
            except grpc.RpcError as e:  # weights that overflow once scaled: that request alone
                assert e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL), e.details()
                assert "Inf" in e.details() or "non-finite" in e.details(), e.details()
            finally:
                hserver.client.unregister_adapter("fuzz")
        assert hserver.health_status() == SERVING

    registration_campaign(hserver, check, seen)


tokenizer_fields = st.fixed_dictionaries({}, optional={
    "tokenizer_class": st.one_of(st.sampled_from(["PreTrainedTokenizerFast", "GPT2Tokenizer", "Nope", "AutoModel"]),
                                 json_value),
    "chat_template": st.one_of(st.sampled_from([
        "{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ raise_exception('no') }}", "{% for",
        "{{ messages[99]['content'] }}", "{% for i in range(10**9) %}x{% endfor %}", "{{ ''.__class__.__mro__ }}",
        "{{ 1 // 0 }}", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"]),
        json_value),
    "eos_token": st.one_of(st.sampled_from(["<|im_end|>", "<new>", ""]), json_value),
    "added_tokens_decoder": json_value,
    "auto_map": st.one_of(st.just({"AutoTokenizer": ["evil.Tok", None]}), json_value),
    "extra_special_tokens": json_value,
    "model_max_length": number,
})


def test_fuzzed_tokenizers_beside_adapters_never_hurt_the_server(hserver, tiny_llama, tiny_adapters):
    """A tokenizer saved beside an adapter, its config fuzzed (classes, templates that raise,
    loop or reach for Python's internals, EOS tokens, remote code) and its tokenizer.json sometimes
    broken: registration refuses it with FAILED_PRECONDITION or serves it, and the adapter's
    tokenizing and chats then succeed or fail alone, never the server."""
    base = json.loads((tiny_llama / "tokenizer_config.json").read_text())
    seen = set()

    @settings(max_examples=max(20, FUZZ_EXAMPLES // 4), deadline=None, suppress_health_check=list(HealthCheck))
    @given(change=tokenizer_fields, broken=st.sampled_from([None, b"", b"{not json", b'{"model": {"type": "BPE"}}']))
    def check(change, broken):
        path = adapter_copy(hserver, tiny_adapters, "tok")
        for f in tiny_llama.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, path)
        (path / "tokenizer_config.json").write_text(json.dumps({**base, **change}))
        (path / "chat_template.jinja").unlink(missing_ok=True)  # the config's template, if it has one, is read
        if broken is not None:
            (path / "tokenizer.json").write_bytes(broken)
        if served(hserver, "tok", path, seen, change):
            try:
                for call in (lambda: hserver.client.tokenize(messages=[("user", "hi")], adapter_id="tok"),
                             lambda: hserver.client.generate(prompt="hi <new>", adapter_id="tok",
                                                             sampling=Sampling(max_new_tokens=3, ignore_eos=True))):
                    try:
                        call()
                    except grpc.RpcError as e:  # a template or a token that fails: that call alone
                        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED), \
                            (e.code(), e.details(), change)
            finally:
                hserver.client.unregister_adapter("tok")
        assert hserver.health_status() == SERVING

    registration_campaign(hserver, check, seen)


def test_sigterm_still_drains_after_the_campaigns(hserver):
    """Last in the module: the server the campaigns ran against still shuts down cleanly."""
    hserver.proc.send_signal(signal.SIGTERM)
    assert hserver.proc.wait(30) == 0
