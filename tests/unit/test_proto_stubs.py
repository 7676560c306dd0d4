"""The committed stubs are exactly what grpcio-tools generates from the .proto (`make proto`)."""

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("loramux_pb2.py", "loramux_pb2.pyi", "loramux_pb2_grpc.py")


def test_generated_stubs_are_fresh(tmp_path):
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      str(ROOT / "proto/loramux/v1/loramux.proto")])
    assert rc == 0
    for name in GENERATED:
        fresh = (tmp_path / "loramux/v1" / name).read_text()
        committed = (ROOT / "proto/loramux/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_the_stubs_accept_every_grpcio_and_protobuf_the_project_allows():
    """The stubs refuse a grpcio older than the grpcio-tools that made them, and a protobuf older
    than their gencode: the floors in pyproject.toml must be those versions, no lower (an install
    that then fails at import) and no higher (the GPU image's grpcio 1.84.0 refused for nothing)."""
    import re

    pyproject = (ROOT / "pyproject.toml").read_text()
    grpc_stub = (ROOT / "proto/loramux/v1/loramux_pb2_grpc.py").read_text()
    pb2 = (ROOT / "proto/loramux/v1/loramux_pb2.py").read_text()
    generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub).group(1)
    gencode = re.search(r"# Protobuf Python Version: ([\d.]+)", pb2).group(1)
    assert re.search(r'"grpcio>=([\d.]+)"', pyproject).group(1) == generated
    assert re.search(r'"grpcio-tools==([\d.]+)"', pyproject).group(1) == generated
    assert re.search(r'"protobuf>=([\d.]+)"', pyproject).group(1) == gencode
