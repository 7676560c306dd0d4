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
