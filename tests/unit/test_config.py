"""The one config object refuses inconsistent settings, naming the flag."""

import re
from pathlib import Path

import pytest

from loramux.server.cli import build_parser, config_from_args
from loramux.server.config import ServerConfig


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_device_adapters=8, max_host_adapters=4), "max-host-adapters"),
    (dict(max_batch_size=64, max_tokens_per_step=32), "max-tokens-per-step"),
    (dict(max_model_len=128), "default-max-new-tokens"),
    (dict(dtype="float64"), "dtype"),
    (dict(max_lora_rank=0), "max-lora-rank"),
    (dict(tls_cert="a.pem"), "tls-key"),
    (dict(tls_client_ca="ca.pem"), "tls-client-ca"),
    (dict(max_input_tokens=5000), "max-input-tokens"),
    (dict(port=70000), "port"),
    (dict(port=8000), "--http-port and --port are both 8000"),
    (dict(metrics_port=8000), "--metrics-port and --http-port are both 8000"),
    (dict(port=9400, metrics_host="0.0.0.0"), "--metrics-port and --port are both 9400"),
    (dict(inject_fault="explode:x"), "inject-fault"),
    (dict(auth_token=""), "auth-token is empty"),
    (dict(admin_token=""), "admin-token is empty"),
    (dict(allow_runtime_adapters=True, host="0.0.0.0"), "--insecure-admin"),
    (dict(allow_runtime_adapters=True, host="10.1.2.3", auth_token="t"), "--admin-token"),
    (dict(max_stop_token_ids=0), "max-stop-token-ids"),
    (dict(max_registered_adapters=0), "max-registered-adapters"),
    (dict(max_concurrent_rpcs=100, max_queued_requests=100), "max-concurrent-rpcs"),
    (dict(stream_stall_timeout=0.0), "stream-stall-timeout"),
    (dict(work_timeout=float("nan")), "work-timeout"),
    (dict(adapter_cache_max_gib=0.0), "adapter-cache-max-gib"),
    (dict(adapter_cache_max_gib=float("inf")), "adapter-cache-max-gib"),
    (dict(lora_dtype="float64"), "lora-dtype must be one of"),
    (dict(tool_call_parser="granite"), "tool-call-parser must be one of"),
    (dict(tool_call_parser="openai", reasoning_parser="qwen3"), "needs --reasoning-parser openai_gptoss"),
    (dict(chat_template_content_format="list"), "chat-template-content-format must be one of"),
    (dict(base_linear="fast"), "base-linear must be one of"),
    (dict(quantization="int4"), "quantization must be one of"),
    (dict(http_keep_alive_timeout=0), "http-keep-alive-timeout must be > 0"),
    (dict(max_saved_modules=-1), "max-saved-modules must be >= 0"),
    (dict(cuda_graphs="yes"), "cuda-graphs must be one of"),
    (dict(adapter_io_threads=0), "adapter-io-threads must be >= 1"),
    (dict(cached_state_interval=24), "cached-state-interval must be 0 or a positive multiple of kv-block-size (16)"),
    (dict(cached_state_interval=-16), "cached-state-interval must be 0 or a positive multiple"),
])
def test_inconsistent_settings_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        ServerConfig(**kwargs)


def test_listeners_on_distinct_hosts_or_turned_off_may_share_a_port_number():
    ServerConfig(port=8000, http_host="127.0.0.2")  # two loopback addresses
    ServerConfig(http_port=0, port=9400, metrics_port=9400, metrics_host="127.0.0.2")
    ServerConfig(port=0, http_port=0, metrics_port=0)  # 0: an ephemeral port, or off


def test_cli_flags_become_one_config():
    args = build_parser().parse_args([
        "serve", "--port", "6000", "--max-batch-size", "8", "--adapter", "a=/x/a", "--adapter", "b=/x/b",
        "--adapter-root", "/x", "--auth-token", "t", "--max-total-tokens", "900", "--allow-runtime-adapters",
        "--lora-dtype", "float16", "--http-keep-alive-timeout", "2.5", "--base-linear", "kernel",
        "--quantization", "int8", "--cuda-graphs", "off", "--adapter-io-threads", "3", "--no-flush-denormals",
    ])
    c = config_from_args(args)
    assert (c.port, c.max_batch_size, c.auth_token, c.max_total_tokens) == (6000, 8, "t", 900)
    assert c.lora_dtype == "float16" and ServerConfig().lora_dtype == "auto"
    assert c.base_linear == "kernel" and ServerConfig().base_linear == "auto"
    assert c.quantization == "int8" and ServerConfig().quantization == "none"
    assert c.cuda_graphs == "off" and ServerConfig().cuda_graphs == "auto"
    assert c.adapter_io_threads == 3 and ServerConfig().adapter_io_threads is None
    assert not c.flush_denormals and ServerConfig().flush_denormals
    # clients (httpx: 5 s) and load balancers (60 s) must close idle connections before the server does
    assert c.http_keep_alive_timeout == 2.5 and ServerConfig().http_keep_alive_timeout > 60
    assert c.adapters == (("a", "/x/a"), ("b", "/x/b")) and c.adapter_roots == ("/x",)
    assert c.runtime_adapters_enabled and ServerConfig(admin_token="x").runtime_adapters_enabled
    assert not ServerConfig().runtime_adapters_enabled


def test_bad_adapter_flag_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adapter", "no-equals-sign"])


def test_combine_flags_parse_into_the_config():
    args = build_parser().parse_args(["serve", "--combine", "mix=a:0.5,team/b:v2:-1.25", "--combine", "one=a:1"])
    assert config_from_args(args).combinations == (("mix", (("a", 0.5), ("team/b:v2", -1.25))), ("one", (("a", 1.0),)))
    for bad in ("no-equals", "mix=", "mix=a", "mix=a:x", "mix=a:1,b"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--combine", bad])


def test_runtime_registration_off_loopback_needs_an_admin_token_or_an_explicit_opt_in():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        ServerConfig(allow_runtime_adapters=True, host=host)
    ServerConfig(allow_runtime_adapters=True, host="0.0.0.0", admin_token="a")
    ServerConfig(allow_runtime_adapters=True, host="0.0.0.0", insecure_admin=True)


def test_empty_token_environment_variables_are_refused(monkeypatch):
    monkeypatch.setenv("LORAMUX_AUTH_TOKEN", "")
    with pytest.raises(ValueError, match="LORAMUX_AUTH_TOKEN"):
        config_from_args(build_parser().parse_args(["serve"]))


@pytest.mark.parametrize("target, warned", [
    ("127.0.0.1:50051", False), ("localhost:50051", False), ("[::1]:50051", False),
    ("10.0.0.7:50051", True), ("dns:///serving.example.com:443", True), ("example.com:50051", True),
])
def test_clients_warn_before_sending_a_token_in_plaintext(target, warned, recwarn):
    from loramux.clients.client import LoraMuxClient
    from loramux.clients.types import PlaintextTokenWarning

    LoraMuxClient(target, token="t").close()
    LoraMuxClient(target).close()  # no token: nothing to leak
    assert [w.category for w in recwarn.list if w.category is PlaintextTokenWarning] == \
        ([PlaintextTokenWarning] if warned else [])


def test_the_kv_pool_on_cuda_leaves_room_for_fully_trained_modules(monkeypatch):
    """The default KV pool on CUDA takes its share of the free memory less what --max-saved-modules
    copies may take; --kv-cache-tokens is taken as given."""
    import torch

    from loramux.server.builder import CUDA_KV_FRACTION, kv_pool_tokens

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda")
    assert kv_pool_tokens(ServerConfig(), 1024, cuda) == int(10 * 2**30 * CUDA_KV_FRACTION) // 1024
    assert kv_pool_tokens(ServerConfig(), 1024, cuda, 2 * 2**30) == int(8 * 2**30 * CUDA_KV_FRACTION) // 1024
    assert kv_pool_tokens(ServerConfig(), 1024, cuda, 20 * 2**30) == 0
    assert kv_pool_tokens(ServerConfig(kv_cache_tokens=4096), 1024, cuda, 2 * 2**30) == 4096


def test_gpu_memory_utilization_sizes_the_kv_pool_from_the_devices_memory(monkeypatch):
    """--gpu-memory-utilization F: the KV pool is F of the device's memory less what this process's
    tensors hold (the model, the adapter pool) and the saved modules' room, whatever else is free;
    torch's cached blocks count as this process's; more than is free, or any value on a CPU, is a
    start-up error that names the flag."""
    import torch

    from loramux.server.builder import kv_pool_tokens
    from loramux.server.config import StartupError
    from loramux.server.preflight import refuse_gpu_fraction_off_cuda

    gib = 2**30
    memory = {"free": 60 * gib, "allocated": 10 * gib, "reserved": 12 * gib}  # of an 80 GiB device
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (memory["free"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: memory["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: memory["reserved"])
    cuda = torch.device("cuda")
    half = ServerConfig(gpu_memory_utilization=0.5)
    assert kv_pool_tokens(half, 1024, cuda) == 30 * gib // 1024  # 40 GiB less the 10 held
    assert kv_pool_tokens(half, 1024, cuda, 2 * gib) == 28 * gib // 1024
    assert kv_pool_tokens(ServerConfig(gpu_memory_utilization=0.1), 1024, cuda) == 0  # the model alone is more
    # 0.85 of 80 GiB less 10 held = 58 GiB: 60 free and 2 cached are enough; with 50 free, 52 are not
    assert kv_pool_tokens(ServerConfig(gpu_memory_utilization=0.85), 1024, cuda) == 58 * gib // 1024
    memory["free"] = 50 * gib
    with pytest.raises(StartupError, match=r"--gpu-memory-utilization 0.85 asks for 58.0 GiB more of the "
                                           r"device's 80.0 GiB, but 52.0 GiB is free"):
        kv_pool_tokens(ServerConfig(gpu_memory_utilization=0.85), 1024, cuda)
    with pytest.raises(StartupError, match="--gpu-memory-utilization sizes the KV pool on a CUDA device; this "
                                           "server runs on cpu: use --kv-cache-tokens"):
        refuse_gpu_fraction_off_cuda(half, torch.device("cpu"))
    refuse_gpu_fraction_off_cuda(half, cuda)
    refuse_gpu_fraction_off_cuda(ServerConfig(), torch.device("cpu"))


def test_paths_named_by_flags_that_cannot_be_read_are_startup_errors_naming_the_flag(tmp_path):
    """--adapter-dir, --model and the TLS files: each unusable path a StartupError with its flag,
    its path and why (the server's bad-flag status), not an OSError's traceback."""
    from loramux.server.app import server_credentials
    from loramux.server.config import StartupError
    from loramux.server.model_loader import resolve_model_dir
    from loramux.server.preflight import adapter_dir_entries

    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "note.txt").write_text("not an adapter")
    for passed_over in (".cache", ".git", "..data", "lost+found"):  # a download's, a volume's: no adapters
        (tmp_path / passed_over).mkdir()
    assert adapter_dir_entries((str(tmp_path),)) == [("a", tmp_path / "a"), ("b", tmp_path / "b")]
    for folder, why in ((tmp_path / "gone", "No such file or directory"), (tmp_path / "note.txt", "Not a directory")):
        with pytest.raises(StartupError, match=f"^--adapter-dir {re.escape(str(folder))}: {why}$"):
            adapter_dir_entries((str(tmp_path), str(folder)))
    with pytest.raises(StartupError, match=f"^--model {re.escape(str(tmp_path / 'm.gguf'))}: no such GGUF file$"):
        resolve_model_dir(ServerConfig(model=str(tmp_path / "m.gguf"), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(StartupError, match=f"^--model {re.escape(str(tmp_path))}: no config.json there"):
        resolve_model_dir(ServerConfig(model=str(tmp_path)))
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    with pytest.raises(StartupError, match=f"^--tls-key {re.escape(str(key))}: No such file or directory$"):
        server_credentials(ServerConfig(tls_cert=str(cert), tls_key=str(key)))
    key.write_text("key")
    with pytest.raises(StartupError, match=f"^--tls-cert {re.escape(str(cert))}: No such file or directory$"):
        server_credentials(ServerConfig(tls_cert=str(cert), tls_key=str(key)))
    cert.write_text("cert")
    with pytest.raises(StartupError, match=f"^--tls-client-ca {re.escape(str(tmp_path / 'ca.pem'))}: No such file or directory$"):
        server_credentials(ServerConfig(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(tmp_path / "ca.pem")))


def test_start_up_adapters_are_checked_before_the_model_loads_as_far_as_they_can_be(tmp_path):
    """--adapter, --adapter-dir's folders, --combine and --keep-resident: what can be known without
    the model (ids, their count, each folder's files, the ids the others name) refused naming the
    flag, before the load (each was found only after it)."""
    from loramux.server.config import StartupError
    from loramux.server.preflight import startup_adapters

    def adapter(name, weights="adapter_model.safetensors"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")  # its contents need the model: read at load
        (tmp_path / name / weights).write_bytes(b"")
        return str(tmp_path / name)

    a, b, pickled = adapter("a"), adapter("b"), adapter("p", "adapter_model.bin")
    (tmp_path / "bare").mkdir()
    folder = [("b", Path(b))]

    def check(**kwargs):
        return startup_adapters(ServerConfig(**{"adapters": (("a", a),), **kwargs}), folder)

    assert check(combinations=(("mix", (("a", 0.5), ("b", 1.0))), ("outer", (("mix", 1.0),))),
                 keep_resident=("mix", "b")) == [("a", a), ("b", Path(b))]
    assert check(adapters=(("p", pickled),), allow_pickle=True)[0] == ("p", pickled)
    refused = [
        (dict(adapters=(("x", str(tmp_path / "gone")),)),
         f"--adapter x={tmp_path / 'gone'}: the adapter path is not a directory"),
        (dict(adapters=(("x", str(tmp_path / "bare")),)),
         f"--adapter x={tmp_path / 'bare'}: adapter_config.json is missing from the adapter directory"),
        (dict(adapters=(("p", pickled),)), f"--adapter p={pickled}: adapter_model.bin is pickle-based and refused"),
        (dict(adapters=(("../up", a),)), "--adapter ../up=.*: adapter id '../up' is invalid"),
        (dict(adapters=(("b", a),)), f"adapter 'b' is given twice at start-up \\({a} and {b}\\)"),
        (dict(max_registered_adapters=2, combinations=(("mix", (("a", 1.0),)),)),
         "3 start-up adapters \\(--adapter, --adapter-dir, --combine\\); --max-registered-adapters is 2"),
        (dict(combinations=(("mix", (("a", 1.0), ("nope", 1.0))),)),
         "--combine 'mix': 'nope' is not a start-up adapter \\(--adapter, --adapter-dir\\) or an earlier --combine"),
        (dict(combinations=(("outer", (("mix", 1.0),)), ("mix", (("a", 1.0),)))), "--combine 'outer': 'mix' is not"),
        (dict(combinations=(("b", (("a", 1.0),)),)), f"--combine 'b': 'b' is already a start-up adapter \\({b}\\)"),
        (dict(combinations=(("mix", (("a", float("nan")),)),)), "--combine 'mix': the weight of 'a' in the combination must be finite"),
        (dict(combinations=(("mix", ()),)), "--combine 'mix': a combination needs at least one adapter"),
        (dict(keep_resident=("nope",)), "--keep-resident 'nope': no such start-up adapter"),
    ]
    for kwargs, message in refused:
        with pytest.raises(StartupError, match=f"^{message}"):
            check(**kwargs)
    with pytest.raises(StartupError, match=f"^--adapter-dir {tmp_path}: its folder 'bare': adapter_config.json is "
                                           "missing"):
        startup_adapters(ServerConfig(), [("bare", tmp_path / "bare")])


def test_a_device_this_torch_cannot_use_is_a_startup_error_naming_the_flag():
    import torch

    from loramux.server.config import StartupError
    from loramux.server.preflight import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(StartupError, match="^--device tpu: this torch cannot use it \\(Expected one of cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(StartupError, match="^--device cuda:99: this torch cannot use it \\("):
        resolve_device("cuda:99")  # no such ordinal on a GPU host; no CUDA in a CPU build


def test_an_op_backend_or_cache_folder_that_cannot_serve_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    from loramux.server import builder
    from loramux.server.config import StartupError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it where there is no GPU
    monkeypatch.setattr(builder, "load_model", lambda *_: pytest.fail("the model loaded"))
    (tmp_path / "config.json").write_text("{}")  # a model folder, as far as the checks before its load see
    with pytest.raises(StartupError, match="^--op-backend triton: op backend 'triton' needs the triton package and "
                                           "a CUDA device"):
        builder.build_engine(ServerConfig(model=str(tmp_path), op_backend="triton", device="cpu"))
    (tmp_path / "file").write_text("not a folder")
    under_a_file = tmp_path / "file" / "cache"
    with pytest.raises(StartupError, match=f"^--adapter-cache-dir {re.escape(str(under_a_file))}: Not a directory$"):
        builder.build_engine(ServerConfig(model=str(tmp_path), op_backend="torch", adapter_cache_dir=str(under_a_file)))
    made = tmp_path / "a" / "b"
    with pytest.raises(pytest.fail.Exception, match="the model loaded"):  # made, parents too, before the load
        builder.build_engine(ServerConfig(model=str(tmp_path), op_backend="torch", adapter_cache_dir=str(made)))
    assert made.is_dir()


@pytest.mark.parametrize(("settings", "message"), [
    ({"gpu_memory_utilization": 0.0}, r"gpu-memory-utilization must be in \(0, 1\], got 0.0"),
    ({"gpu_memory_utilization": 1.5}, r"gpu-memory-utilization must be in \(0, 1\], got 1.5"),
    ({"gpu_memory_utilization": float("nan")}, r"gpu-memory-utilization must be in \(0, 1\], got nan"),
    ({"gpu_memory_utilization": 0.5, "kv_cache_tokens": 4096}, "set kv-cache-tokens or gpu-memory-utilization"),
])
def test_gpu_memory_utilization_is_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**settings)


def test_adapter_io_threads_default_to_one_on_a_cpu_and_a_quarter_of_the_cores_on_cuda(monkeypatch):
    import torch

    from loramux.server.builder import adapter_io_threads

    monkeypatch.setattr("loramux.server.builder.usable_cores", lambda: 16)
    assert adapter_io_threads(ServerConfig(), torch.device("cpu")) == 1
    assert adapter_io_threads(ServerConfig(), torch.device("cuda")) == 4
    assert adapter_io_threads(ServerConfig(adapter_io_threads=2), torch.device("cpu")) == 2
    monkeypatch.setattr("loramux.server.builder.usable_cores", lambda: 2)
    assert adapter_io_threads(ServerConfig(), torch.device("cuda")) == 1


def test_io_threads_share_the_cores_on_cuda_and_run_serially_on_a_cpu(monkeypatch):
    import torch

    from loramux.server.builder import io_openmp
    from loramux.server.torch_threads import serial_openmp, thread_openmp

    monkeypatch.setattr("loramux.server.builder.usable_cores", lambda: 16)
    assert io_openmp(torch.device("cpu"), 1) is serial_openmp
    on_cuda = io_openmp(torch.device("cuda"), 4)
    assert on_cuda.func is thread_openmp and on_cuda.args == (4,)
    assert io_openmp(torch.device("cuda"), 32).args == (1,)
