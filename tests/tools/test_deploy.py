"""deploy/: every manifest parses and agrees with `loramux serve` (flags, ports, metric names)."""

import re
from pathlib import Path

import pytest
import yaml

from loramux.server.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def documents(name):
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name)
    return found[0]


def serve_config(args):
    """The container's flags, parsed exactly as `loramux serve` parses them."""
    return config_from_args(build_parser().parse_args(["serve", *args]))


@pytest.fixture(scope="module")
def loramux():
    docs = documents("loramux.yaml")
    deployment = by_kind(docs, "Deployment", "loramux")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return docs, deployment, container, serve_config(container["args"])


def test_every_flag_parses_into_a_valid_config(loramux):
    _, _, container, config = loramux
    flags = {a.split("=")[0] for a in container["args"]}
    known = {opt for action in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
             for opt in action.option_strings}
    assert flags <= known
    assert config.dynamic_adapters and config.adapter_roots == ("/adapters",)


def test_ports_agree_across_deployment_service_and_pool(loramux):
    docs, deployment, container, config = loramux
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and ports[probe["port"]] == config.http_port
    assert container["livenessProbe"]["grpc"]["port"] == config.port
    service = by_kind(docs, "Service", "loramux")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    pool_docs = documents("inferencepool.yaml")
    pool = by_kind(pool_docs, "InferencePool")
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [config.http_port]  # the EPP scrapes /metrics here
    assert pool["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    epp_service = by_kind(pool_docs, "Service", pool["spec"]["endpointPickerRef"]["name"])
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    route = by_kind(pool_docs, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]


def test_graceful_termination_outlasts_the_drain_and_adapters_come_from_the_root(loramux):
    _, deployment, container, config = loramux
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(config.adapter_roots) <= set(mounts)
    assert {v["name"] for v in pod["volumes"]} >= set(mounts.values())


def test_the_endpoint_picker_reads_metrics_loramux_exports(tiny_llama):
    from prometheus_client import generate_latest

    from loramux.server.builder import build_engine
    from loramux.server.config import ServerConfig
    from loramux.server.metrics import Metrics

    built = build_engine(ServerConfig(model=str(tiny_llama), max_batch_size=4, max_model_len=64,
                                      default_max_new_tokens=8, metrics_port=0))
    exported = set(re.findall(r"^# TYPE (\S+)", generate_latest(Metrics(built, 5).registry).decode(), re.M))
    epp = by_kind(documents("inferencepool.yaml"), "Deployment", "loramux-epp")
    args = dict(a.split("=", 1) for a in epp["spec"]["template"]["spec"]["containers"][0]["args"])
    read = {args[f] for f in ("--total-queued-requests-metric", "--kv-cache-usage-percentage-metric",
                              "--lora-info-metric")}
    assert read <= exported, read - exported
    assert {"vllm:num_requests_running", "loramux_kv_cache_usage_ratio"} <= exported
    config = yaml.safe_load(by_kind(documents("inferencepool.yaml"), "ConfigMap")["data"]["config.yaml"])
    assert "lora-affinity-scorer" in {p["type"] for p in config["plugins"]}


def test_the_dockerfile_command_is_a_valid_serve_command():
    text = (DEPLOY / "Dockerfile").read_text()
    entry = re.search(r'^ENTRYPOINT \[(.*)\]$', text, re.M).group(1)
    cmd = re.search(r'^CMD \[(.*)\]$', text, re.M).group(1)
    assert [s.strip().strip('"') for s in entry.split(",")] == ["loramux", "serve"]
    config = serve_config([s.strip().strip('"') for s in cmd.split(",")])
    assert config.http_port in [int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()]
    assert {config.port, config.metrics_port} <= {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}
