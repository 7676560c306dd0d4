"""The OpenAI-compatible HTTP API against the real server, through the official `openai` package."""

import json
import shutil
import threading
import time

import openai
import pytest
import torch

from loramux.clients.types import Sampling

try:  # the HTTP client the installed openai package uses
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases use httpx
    import httpx

from server import ServerProcess
from test_grpc import PROMPT_IDS, total, wait_idle

GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def oserver(tiny_llama, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("oroot")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-dir", str(next(iter(tiny_adapters.values())).parent),
         "--adapter-root", str(root), "--dynamic-adapters", "--max-registered-adapters", "10",
         "--max-batch-size", "8", "--max-model-len", "256", "--default-max-new-tokens", "16",
         "--max-http-body-bytes", "200000"],
        tmp_path_factory.mktemp("ologs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    proc.oa = proc.openai()
    yield proc
    proc.stop()


def grpc_tokens(server, adapter="", **sampling):
    return server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter,
                                  sampling=Sampling(max_new_tokens=10, ignore_eos=True, **sampling))


def test_models_lists_the_base_model_and_every_adapter(oserver, tiny_adapters):
    info = oserver.client.server_info()
    models = {m.id: m for m in oserver.oa.models.list().data}
    assert info.model in models and models[info.model].parent is None
    for name in tiny_adapters:
        assert models[name].parent == info.model


@pytest.mark.parametrize("adapter", ["", "attn-r4", "all-r16-rslora"])
def test_completions_give_grpc_tokens_plain_and_streamed(oserver, adapter):
    model = adapter or oserver.client.server_info().model
    expected = grpc_tokens(oserver, adapter)
    got = oserver.oa.completions.create(model=model, prompt=PROMPT_IDS, **GREEDY)
    assert got.choices[0].text == expected.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == \
        (len(PROMPT_IDS), 10, len(PROMPT_IDS) + 10)
    chunks = list(oserver.oa.completions.create(model=model, prompt=PROMPT_IDS, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_gives_grpc_text_plain_and_streamed(oserver):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about LoRA."}]
    expected = oserver.client.generate(messages=[(m["role"], m["content"]) for m in messages], adapter_id="all-r8",
                                       sampling=Sampling(max_new_tokens=10, ignore_eos=True))
    got = oserver.oa.chat.completions.create(model="all-r8", messages=messages, **GREEDY)
    assert got.choices[0].message.content == expected.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == expected.prompt_tokens and got.usage.completion_tokens == 10
    stream = oserver.oa.chat.completions.create(model="all-r8", messages=messages, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    # max_completion_tokens works too, and the text is a prefix of the longer run
    short = oserver.oa.chat.completions.create(model="all-r8", messages=messages, temperature=0,
                                               max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and expected.text.startswith(short.choices[0].message.content)


def test_sampling_parameters_reach_the_engine(oserver):
    seeded = dict(model="attn-r4", prompt=PROMPT_IDS, max_tokens=8, temperature=0.9, top_p=0.9, seed=11,
                  extra_body={"top_k": 20, "repetition_penalty": 1.2, "ignore_eos": True})
    a = oserver.oa.completions.create(**seeded).choices[0].text
    assert a == oserver.oa.completions.create(**seeded).choices[0].text
    expected = grpc_tokens(oserver, "attn-r4", temperature=0.9, top_p=0.9, seed=11, top_k=20, repetition_penalty=1.2)
    assert oserver.oa.completions.create(**{**seeded, "max_tokens": 10}).choices[0].text == expected.text
    stop = expected.text[3:6]
    if stop.strip():
        cut = oserver.oa.completions.create(**{**seeded, "max_tokens": 10, "stop": [stop]}).choices[0]
        assert stop not in cut.text and cut.finish_reason == "stop"


def peft_logprobs(model_dir, adapter_dir, prompt, generated):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)  # [generated, vocab]


def test_logprobs_equal_peft_log_softmax_in_both_apis(oserver, tiny_llama, tiny_adapters):
    got = oserver.oa.chat.completions.create(
        model="attn-r4", messages=[{"role": "user", "content": "Tell me about LoRA."}], logprobs=True,
        top_logprobs=5, **GREEDY)
    grpc = oserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4",
                                   sampling=Sampling(max_new_tokens=10, ignore_eos=True, logprobs=5))
    ref = peft_logprobs(tiny_llama, tiny_adapters["attn-r4"], PROMPT_IDS, grpc.token_ids)
    for i, lp in enumerate(grpc.logprobs):
        assert lp.token_id == grpc.token_ids[i]
        assert abs(lp.logprob - ref[i, lp.token_id].item()) < 1e-4
        top = ref[i].topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, top.values.tolist(), strict=True)) < 1e-4
    content = got.choices[0].logprobs.content
    assert len(content) == 10 and all(len(c.top_logprobs) == 5 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)  # greedy
    # completions: the legacy shape, and the same numbers for the same tokens as gRPC
    comp = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logprobs=3, **GREEDY)
    lps = comp.choices[0].logprobs
    assert max(abs(a - b.logprob) for a, b in zip(lps.token_logprobs, grpc.logprobs, strict=True)) < 1e-5
    assert len(lps.tokens) == 10 and all(1 <= len(t) <= 3 for t in lps.top_logprobs)  # keyed by text: may merge
    # and nothing when nobody asks
    assert oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, **GREEDY).choices[0].logprobs is None
    assert grpc_tokens(oserver, "attn-r4").logprobs == []


def test_bad_requests_get_the_clients_own_exceptions(oserver):
    for kwargs, needle in [
        (dict(n=2), "n"), (dict(logprobs=21), "logprobs"), (dict(max_tokens=10**6), "max_new_tokens"),
        (dict(temperature=-1), "temperature"), (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(extra_body={"top_k": -3}), "top_k"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            oserver.oa.completions.create(model="attn-r4", prompt="hi", **kwargs)
        assert needle in e.value.message and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as e:
        oserver.oa.completions.create(model="no-such-model", prompt="hi")
    assert "no-such-model" in e.value.message
    body = httpx.post(f"{oserver.base_url}/completions", content=b"x" * 300_000,
                      headers={"content-type": "application/json"})
    assert body.status_code == 413 and "--max-http-body-bytes" in body.json()["error"]["message"]
    bad_json = httpx.post(f"{oserver.base_url}/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()


def test_health_and_metrics_on_the_http_port(oserver):
    assert httpx.get(f"http://127.0.0.1:{oserver.http_port}/health").status_code == 200
    text = httpx.get(f"http://127.0.0.1:{oserver.http_port}/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:lora_requests_info", "loramux_requests_total"):
        assert name in text


def test_a_client_disconnect_mid_stream_frees_the_request(oserver):
    with httpx.stream("POST", f"{oserver.base_url}/completions", json={
            "model": "attn-r4", "prompt": PROMPT_IDS, "max_tokens": 200, "stream": True, "ignore_eos": True},
            timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    m = wait_idle(oserver)  # closed after two events: the request is cancelled, not run to 200 tokens
    assert m["loramux_kv_cache_usage_ratio"] == 0 and m["loramux_adapter_pins"] == 0
    assert total(m, "loramux_generated_tokens_total", adapter="attn-r4") < 10_000


def test_dynamic_adapters_register_on_first_use(oserver, tiny_adapters):
    shutil.copytree(tiny_adapters["attn-r4"], oserver.root / "dyn-first")
    expected = grpc_tokens(oserver, "attn-r4").text
    got = oserver.oa.completions.create(model="dyn-first", prompt=PROMPT_IDS, **GREEDY)
    assert got.choices[0].text == expected
    assert "dyn-first" in {m.id for m in oserver.oa.models.list().data}
    # gRPC callers get the same grant
    shutil.copytree(tiny_adapters["all-r8"], oserver.root / "dyn-grpc")
    assert grpc_tokens(oserver, "dyn-grpc").text == grpc_tokens(oserver, "all-r8").text


def test_concurrent_first_uses_register_once(oserver, tiny_adapters):
    shutil.copytree(tiny_adapters["all-r8"], oserver.root / "dyn-burst")
    before = total(oserver.metrics(), "loramux_dynamic_adapters_total", event="registered")
    results = []

    def one():
        results.append(oserver.oa.completions.create(model="dyn-burst", prompt=PROMPT_IDS, **GREEDY).choices[0].text)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert total(oserver.metrics(), "loramux_dynamic_adapters_total", event="registered") == before + 1
    assert oserver.log().count("dynamic adapter dyn-burst registered") == 1


def test_dynamic_adapters_cannot_escape_the_root_and_bad_ones_are_named(oserver, tiny_adapters, tmp_path):
    outside = shutil.copytree(tiny_adapters["attn-r4"], tmp_path / "outside")
    (oserver.root / "link-out").symlink_to(outside)
    for model in ("../outside", "link-out", "/etc", "a/../../x"):
        with pytest.raises(openai.PermissionDeniedError):
            oserver.oa.completions.create(model=model, prompt="hi")
    bad = shutil.copytree(tiny_adapters["attn-r4"], oserver.root / "dyn-bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": "sixteen"}))
    with pytest.raises(openai.BadRequestError) as e:
        oserver.oa.completions.create(model="dyn-bad", prompt="hi")
    assert "lora_alpha" in e.value.message
    assert "dyn-bad" not in {m.id for m in oserver.oa.models.list().data}
    wait_idle(oserver)


def test_a_full_registry_makes_room_from_idle_dynamic_registrations(oserver, tiny_adapters):
    names = [f"dyn-room{i}" for i in range(4)]  # more than the registry has room for: 10 in all
    for name in names:
        shutil.copytree(tiny_adapters["attn-r4"], oserver.root / name)
        assert oserver.oa.completions.create(model=name, prompt=PROMPT_IDS, **GREEDY).choices[0].text
    assert total(oserver.metrics(), "loramux_dynamic_adapters_total", event="evicted") >= 1
    assert len(oserver.client.list_adapters()) <= 10


@pytest.fixture(scope="module")
def guarded(tiny_llama, tiny_adapters, tmp_path_factory):
    """Auth on, and a registry already full of start-up adapters: a dynamic first use gets 429."""
    root = tmp_path_factory.mktemp("groot")
    shutil.copytree(tiny_adapters["attn-r4"], root / "extra")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--auth-token", "user", "--admin-token", "admin", "--adapter-root", str(root),
         "--dynamic-adapters", "--max-registered-adapters", "2",
         "--adapter", f"attn-r4={tiny_adapters['attn-r4']}", "--adapter", f"all-r8={tiny_adapters['all-r8']}"],
        tmp_path_factory.mktemp("glogs") / "server.log",
    )
    proc.wait_ready()
    yield proc
    proc.stop()


def test_auth_and_rate_limit_statuses(guarded):
    no_token = httpx.get(f"{guarded.base_url}/models")
    assert no_token.status_code == 401 and no_token.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):  # the client's own type for the same status
        guarded.openai(token="x", default_headers={"Authorization": ""}).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        guarded.openai(token="wrong").models.list()
    user, admin = guarded.openai(token="user"), guarded.openai(token="admin")
    assert len(user.models.list().data) == 3 and len(admin.models.list().data) == 3
    with pytest.raises(openai.RateLimitError) as e:
        user.completions.create(model="extra", prompt="hi")
    assert "--max-registered-adapters" in e.value.message
    assert httpx.get(f"http://127.0.0.1:{guarded.http_port}/health").status_code == 200  # open, as gRPC health


def test_http_can_be_turned_off_and_is_not_imported_then(tiny_llama, tmp_path):
    import subprocess
    import sys

    code = ("import sys, loramux.server.app, loramux.server.service; "
            "sys.exit(1 if {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    proc = ServerProcess(["--model", str(tiny_llama)], tmp_path / "log")
    proc.stop()
    proc = ServerProcess(["--model", str(tiny_llama), "--http-port", "0"], tmp_path / "log2")
    try:
        proc.wait_ready()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{proc.http_port}/health", timeout=2)
        assert proc.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=2)).completion_tokens
    finally:
        proc.stop()


def test_drain_turns_http_health_unavailable(tiny_llama, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--drain-timeout", "10"], tmp_path / "log")
    try:
        proc.wait_ready()
        oa = proc.openai()
        stream = oa.completions.create(model=proc.client.server_info().model, prompt=PROMPT_IDS, max_tokens=200,
                                       stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.terminate()
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{proc.http_port}/health", timeout=1).status_code
            except httpx.HTTPError:
                break
            if status == 503:
                break
            time.sleep(0.02)
        assert status == 503
        assert sum(1 for _ in stream) > 0  # the running stream still finishes
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(oserver):
    model = oserver.client.server_info().model
    prompt = list(range(100, 140))  # 2 full blocks of 16 and 8 tokens
    first = oserver.oa.completions.create(model=model, prompt=prompt, **GREEDY)
    again = oserver.oa.completions.create(model=model, prompt=prompt, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    assert again.choices[0].text == first.choices[0].text
