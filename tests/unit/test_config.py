"""The one config object refuses inconsistent settings, naming the flag."""

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
    (dict(inject_fault="explode:x"), "inject-fault"),
])
def test_inconsistent_settings_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ServerConfig(**kwargs)


def test_cli_flags_become_one_config():
    args = build_parser().parse_args([
        "serve", "--port", "6000", "--max-batch-size", "8", "--adapter", "a=/x/a", "--adapter", "b=/x/b",
        "--adapter-root", "/x", "--auth-token", "t", "--max-total-tokens", "900", "--allow-runtime-adapters",
    ])
    c = config_from_args(args)
    assert (c.port, c.max_batch_size, c.auth_token, c.max_total_tokens) == (6000, 8, "t", 900)
    assert c.adapters == (("a", "/x/a"), ("b", "/x/b")) and c.adapter_roots == ("/x",)
    assert c.runtime_adapters_enabled and ServerConfig(admin_token="x").runtime_adapters_enabled
    assert not ServerConfig().runtime_adapters_enabled


def test_bad_adapter_flag_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adapter", "no-equals-sign"])
