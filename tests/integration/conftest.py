import pytest

from server import ServerProcess


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("root")


@pytest.fixture(scope="module")
def server(tiny_llama, tiny_adapters, adapter_root, tmp_path_factory):
    adapters_dir = next(iter(tiny_adapters.values())).parent
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-dir", str(adapters_dir), "--adapter-root", str(adapter_root),
         "--max-batch-size", "8", "--max-model-len", "256", "--max-queued-requests", "12",
         "--default-max-new-tokens", "16", "--max-tokens-per-step", "64", "--metrics-top-adapters", "5",
         "--allow-runtime-adapters", "--enable-dora", "--enable-lm-head-lora", "--enable-embedding-lora",
         "--trust-request-chat-template", "--max-saved-modules", "2",
         "--max-device-adapters", "4", "--max-host-adapters", "8",
         # every request through the real entry points runs with speculative decoding on
         "--num-speculative-tokens", "3", "--prompt-lookup-min", "1"],
        tmp_path_factory.mktemp("logs") / "server.log",
        exec_start=True,  # `python -m` as deployed; its health is seen loading for seconds
    )
    proc.health_seen = proc.wait_ready()
    yield proc
    proc.stop()
