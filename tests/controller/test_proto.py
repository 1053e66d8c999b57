"""controller/northbound/sdqkd_pb2*.py are what sdqkd.proto generates, and it compiles."""
from __future__ import annotations

import shutil

from google.protobuf import descriptor_pb2

from sdqkd.controller.northbound import codegen, sdqkd_pb2, sdqkd_pb2_grpc

RPCS = ["CreateApplication", "DeleteApplication", "ListApplications", "ComputePath", "CreateChannel", "ComputeChannel",
        "DeleteChannel", "ListChannels", "GetTopology", "StreamEvents", "ListReservations", "ListAlarms"]


def test_generated_modules_match_the_proto() -> None:
    problems = codegen.drift()
    assert problems == [], "regenerate with codegen.generate() (python -m sdqkd.controller.northbound.codegen):\n" \
        + "\n".join(problems)


def test_generation_is_deterministic() -> None:
    assert codegen.expected_files() == codegen.expected_files()


def test_drift_is_detected(tmp_path) -> None:
    for name in codegen.OUTPUTS:
        shutil.copy(codegen.HERE / name, tmp_path / name)
    grpc_mod = tmp_path / "sdqkd_pb2_grpc.py"
    grpc_mod.write_text(grpc_mod.read_text().replace("from . import sdqkd_pb2", "import sdqkd_pb2"))
    (tmp_path / "sdqkd_pb2.py").unlink()
    problems = codegen.drift(tmp_path)
    assert len(problems) == 2
    assert any("sdqkd_pb2_grpc.py" in p and "-import sdqkd_pb2" in p for p in problems)


def test_proto_compiles_to_the_service(tmp_path) -> None:
    out = tmp_path / "sdqkd.desc"
    proc = codegen.protoc(f"-I{codegen.PROTO.parent}", f"--descriptor_set_out={out}", "--fatal_warnings", codegen.PROTO.name)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = fds.file
    assert file.package == "sdqkd.v1"
    (service,) = file.service
    assert [m.name for m in service.method] == RPCS
    assert [m.name for m in service.method if m.server_streaming] == ["StreamEvents"]


def test_generated_modules_import_as_a_package() -> None:
    assert sdqkd_pb2_grpc.sdqkd__pb2 is sdqkd_pb2
    assert sdqkd_pb2.Application.__module__ == "sdqkd.controller.northbound.sdqkd_pb2"
    assert sdqkd_pb2.DESCRIPTOR.services_by_name["Controller"].full_name == "sdqkd.v1.Controller"
