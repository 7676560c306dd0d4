"""Prometheus metrics and logs, scraped from the real server after a known set of requests."""

import json
import re
import shutil
import threading
import time

import grpc
import pytest

from loramux.adapters.synthetic import write_random_adapter
from loramux.clients.types import Sampling

from helpers import build_llama, tiny_layout
from server import ServerProcess
from test_grpc import PROMPT_IDS, total, wait_idle

NUM_ADAPTERS = 100


@pytest.fixture(scope="module")
def metrics_server(tiny_llama, tmp_path_factory):
    layout = tiny_layout(tiny_llama)
    adapters = tmp_path_factory.mktemp("hundred")
    for i in range(NUM_ADAPTERS):
        write_random_adapter(adapters / f"a{i:03d}", layout, 4, seed=i, targets=("q_proj", "v_proj"))
    root = tmp_path_factory.mktemp("mroot")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-dir", str(adapters), "--adapter-root", str(root), "--allow-runtime-adapters",
         "--metrics-top-adapters", "5", "--max-device-adapters", "8", "--max-host-adapters", "16",
         "--max-model-len", "256", "--default-max-new-tokens", "16", "--log-format", "json",
         "--cuda-graphs", "on"],  # on a CPU: decode steps through the static path that CUDA graphs replay
        tmp_path_factory.mktemp("mlogs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    proc.adapters = adapters
    yield proc
    proc.stop()


def test_counters_and_histograms_move_exactly(metrics_server):
    s = metrics_server
    before = wait_idle(s)
    plan = [("", 5), ("a000", 7), ("a001", 3), ("a000", 4)]
    for adapter, n in plan:
        s.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter,
                          sampling=Sampling(max_new_tokens=n, ignore_eos=True))
    after = wait_idle(s)

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("loramux_requests_total", status="OK") == 4
    assert moved("loramux_prompt_tokens_total") == 4 * len(PROMPT_IDS)
    assert moved("loramux_generated_tokens_total") == sum(n for _, n in plan)
    for hist in ("request_duration_seconds", "queue_duration_seconds", "time_to_first_token_seconds"):
        key = f"loramux_{hist}_count"
        assert after[key] - before[key] == 4, hist
    itl = "loramux_inter_token_latency_seconds_count"
    assert after[itl] - before[itl] == sum(n - 1 for _, n in plan)
    # one request at a time: after each prefill step, every decode step took the static path
    graph_steps = "loramux_decode_graph_steps_total"
    assert after[graph_steps] - before[graph_steps] == sum(n - 1 for _, n in plan)
    assert after["loramux_batch_size_count"] > before["loramux_batch_size_count"]
    assert after["loramux_step_duration_seconds_count"] == after["loramux_batch_size_count"]
    assert after['loramux_adapters_resident{tier="device"}'] >= 2
    assert after['loramux_adapter_memory_bytes{tier="device"}'] > 0
    assert after['loramux_adapter_load_seconds_count{tier="host"}'] >= 2
    assert moved("loramux_adapter_reloads_total") == 0  # nothing was evicted
    assert after["loramux_step_token_budget"] == 512  # --max-tokens-per-step, with no --target-step-ms
    assert {'loramux_adapter_reloads_total{tier="host"}', 'loramux_adapter_reloads_total{tier="device"}'} <= set(after)


def test_generated_tokens_are_counted_as_they_come(metrics_server):
    """A scrape during a long generation sees its tokens (not only once the request ends), and the
    count at its end is exact."""
    s = metrics_server
    before = total(wait_idle(s), "loramux_generated_tokens_total", adapter="a002")
    stream = s.client.generate_stream(prompt_token_ids=PROMPT_IDS, adapter_id="a002",
                                      sampling=Sampling(max_new_tokens=200, ignore_eos=True))
    seen = [next(stream) for _ in range(20)]
    m = s.metrics()
    during = total(m, "loramux_generated_tokens_total", adapter="a002") - before
    assert m["loramux_running_requests"] == 1, "the request ended before the scrape: the test shows nothing"
    chunks = seen + list(stream)
    assert 20 <= during < 200 and len(chunks) == 200 and chunks[-1].finish_reason == "length"
    assert total(wait_idle(s), "loramux_generated_tokens_total", adapter="a002") - before == 200


def test_rejected_requests_are_counted(metrics_server):
    s = metrics_server
    before = s.metrics()
    with pytest.raises(grpc.RpcError):
        s.client.generate(prompt="")
    with pytest.raises(grpc.RpcError):
        s.client.generate(prompt="hi", adapter_id="no-such-adapter")
    after = s.metrics()
    assert total(after, "loramux_requests_total", status="INVALID_ARGUMENT") - total(
        before, "loramux_requests_total", status="INVALID_ARGUMENT") == 1
    assert total(after, "loramux_requests_total", status="NOT_FOUND", adapter="other") - total(
        before, "loramux_requests_total", status="NOT_FOUND", adapter="other") == 1


def test_gauges_return_to_zero_after_cancel_and_failure(metrics_server):
    s = metrics_server
    stream = s.client.generate_stream(prompt_token_ids=PROMPT_IDS, adapter_id="a002",
                                      sampling=Sampling(max_new_tokens=200, ignore_eos=True))
    next(stream)
    mid = s.metrics()
    assert mid["loramux_running_requests"] == 1 and mid["loramux_kv_cache_usage_ratio"] > 0
    stream.close()
    wait_idle(s)
    broken = shutil.copytree(s.adapters / "a003", s.root / "broken")
    s.client.register_adapter("broken", str(broken))
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(grpc.RpcError) as e:
        s.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="broken")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = wait_idle(s)
    assert after["loramux_running_requests"] == after["loramux_waiting_requests"] == 0
    assert after["loramux_kv_cache_usage_ratio"] == 0
    assert total(after, "loramux_requests_total", status="FAILED_PRECONDITION") >= 1


def test_affinity_gauge_names_running_adapters(metrics_server):
    s = metrics_server
    stream = s.client.generate_stream(prompt_token_ids=PROMPT_IDS, adapter_id="a042",
                                      sampling=Sampling(max_new_tokens=200, ignore_eos=True))
    next(stream)
    running = [k for k in s.metrics() if k.startswith("loramux_lora_requests_info{")]
    vllm = [k for k in s.metrics() if k.startswith("vllm:lora_requests_info{")]
    assert len(running) == len(vllm) == 1
    assert re.search(r'running_lora_adapters="([^"]*)"', running[0]).group(1).split(",") == ["a042"]
    assert 'max_lora="8"' in vllm[0]
    stream.close()
    wait_idle(s)
    idle = [k for k in s.metrics() if k.startswith("vllm:lora_requests_info{")][0]
    assert 'running_lora_adapters=""' in idle


def test_adapter_label_cardinality_is_bounded(metrics_server):
    s = metrics_server
    threads = [threading.Thread(target=s.client.generate,
                                kwargs=dict(prompt_token_ids=PROMPT_IDS, adapter_id=f"a{i:03d}",
                                            sampling=Sampling(max_new_tokens=2)))
               for i in range(10, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = s.metrics()
    labels = {re.search(r'adapter="([^"]*)"', k).group(1) for k in m
              if k.startswith(("loramux_requests_total{", "loramux_generated_tokens_total{"))}
    assert "other" in labels and len(labels - {"other"}) <= 5


def test_one_json_log_line_per_finished_request(metrics_server):
    s = metrics_server
    r = s.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="a001", sampling=Sampling(max_new_tokens=3),
                          request_id="log-me-please")
    time.sleep(0.2)
    lines = [json.loads(line) for line in s.log().splitlines() if line.startswith("{")]
    mine = [x for x in lines if x.get("request_id") == "log-me-please"]
    assert len(mine) == 1
    rec = mine[0]
    assert rec["adapter"] == "a001" and rec["status"] == "OK" and rec["completion_tokens"] == r.completion_tokens
    assert rec["prompt_tokens"] == len(PROMPT_IDS) and rec["total_seconds"] > 0
    assert any("adapters registered" in x["message"] and x["level"] == "INFO" for x in lines)  # start-up summary
    assert any("left out of garbage collection" in x["message"] for x in lines)  # the heap frozen when ready


def test_a_target_step_time_no_step_can_meet_shrinks_the_budget_and_serves_on(tmp_path):
    """--target-step-ms through the CLI: once a few prompts are measured, a target no step meets
    leaves each step its decodes and the least prompt chunk (16 tokens), the gauge says so, and a
    longer prompt still completes, prefilled in those chunks. (A model wide enough that prompt
    tokens cost measurable time, so the fit sees them through another process's load.)"""
    model = build_llama(tmp_path / "model", hidden_size=768, intermediate_size=3072, num_hidden_layers=4)
    proc = ServerProcess(["--model", str(model), "--max-model-len", "256", "--max-tokens-per-step", "240",
                          "--target-step-ms", "0.001", "--default-max-new-tokens", "4"], tmp_path / "server.log")
    try:
        proc.wait_ready()
        assert wait_idle(proc)["loramux_step_token_budget"] == 240
        # ten steps with prompt tokens, of lengths that vary: the fit's input. Prompts that share no
        # block: prefixes of one another hit the prefix cache, leaving the fit a step or two of real
        # prompt tokens, which one slowed step beside a busy test worker made look free
        for k, n in enumerate((24, 200, 60, 160, 100) * 2):
            proc.client.generate(prompt_token_ids=[(7 * i + 11 * k) % 300 + 3 for i in range(n)],
                                 sampling=Sampling(max_new_tokens=1, ignore_eos=True))
        before = wait_idle(proc)
        out = proc.client.generate(prompt_token_ids=[(5 * i) % 300 + 3 for i in range(100)],
                                   sampling=Sampling(max_new_tokens=4, ignore_eos=True))
        after = wait_idle(proc)
        assert len(out.token_ids) == 4
        assert after["loramux_step_token_budget"] == 1 + 16  # its last decode step's: one decode, 16 prompt tokens
        # 100 prompt tokens in chunks of 16 (7 steps), then 3 more decode steps
        assert after["loramux_batch_size_count"] - before["loramux_batch_size_count"] == 7 + 3
    finally:
        proc.stop()
