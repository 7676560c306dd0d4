"""Import direction: the front-end and request types never pull in torch, and adapters/ never
imports server/ (server/ builds on adapters/, not the other way round)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_grpc_layer_and_request_types_are_torch_free():
    code = ("import sys; import loramux.server.grpc_service, loramux.server.grpc_convert, loramux.server.requests, "
            "loramux.server.app, loramux.clients.client; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("flags", [{"model": "not-there"}, {"device": "tpu"}, {"adapter_dirs": ("not-there",)},
                                   {"gpu_memory_utilization": 0.5, "device": "cpu"}], ids=lambda f: next(iter(f)))
def test_a_wrong_flag_is_refused_before_transformers_loads(tiny_llama, flags):
    """The server checks its flags with torch alone before it builds (transformers' imports take
    about 5 s before a model even starts loading): each wrong one is refused, and nothing of
    transformers or the serving models has loaded."""
    kwargs = {"model": str(tiny_llama), **flags}
    code = ("import sys; from loramux.server.config import ServerConfig, StartupError; "
            "from loramux.server.preflight import preflight\n"
            f"try:\n    preflight(ServerConfig(**{kwargs!r}))\nexcept StartupError as e:\n    print(e)\n"
            "else:\n    sys.exit('not refused')\n"
            "heavy = sorted(m for m in sys.modules if m.startswith(('transformers', 'loramux.server.models')))\n"
            "sys.exit(f'loaded {heavy}' if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    flag = next(iter(flags)).removesuffix("s").replace("_", "-")
    assert out.stdout.startswith(f"--{flag} "), out.stdout


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved inside the loramux namespace."""
    tree = ast.parse(path.read_text())
    package = ["loramux", path.parent.name]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module)
    return found


def test_adapters_never_import_server():
    offenders = {p.name: sorted(m for m in imports_of(p) if m.startswith("loramux.server"))
                 for p in (ROOT / "adapters").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_walker_sees_relative_imports():
    """A check that could never fail would prove nothing: server/ does import adapters/."""
    assert any(m.startswith("loramux.adapters") for m in imports_of(ROOT / "server" / "builder.py"))
