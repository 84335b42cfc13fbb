"""The committed generated modules match what `python -m twotower.protos.generate` makes from the .proto."""

from __future__ import annotations

import importlib
import pickle

import pytest

from twotower.protos import generate


def test_generated_files_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    written = generate.generate(tmp_path)
    expected = [n for p in generate.PROTOS for n in generate.generated_names(p)]
    assert sorted(p.name for p in written) == sorted(expected)
    stale = [n for n in expected if (tmp_path / n).read_text() != (generate.PROTO_DIR / n).read_text()]
    assert not stale, f"{stale} differ from the .proto; run `python -m twotower.protos.generate` and commit"


def test_generated_modules_import_inside_the_package():
    pb2 = importlib.import_module("twotower.protos.twotower_v1_pb2")
    grpc_mod = importlib.import_module("twotower.protos.twotower_v1_pb2_grpc")
    assert grpc_mod.twotower_dot_protos_dot_twotower__v1__pb2 is pb2
    from twotower import protos

    assert protos.GenerateRequest is pb2.GenerateRequest and protos.pb2 is pb2 and protos.pb2_grpc is grpc_mod
    assert protos.add_TwoTowerServicer_to_server is grpc_mod.add_TwoTowerServicer_to_server
    assert pb2.DESCRIPTOR.services_by_name["TwoTower"].full_name == protos.SERVICE_NAME


def test_messages_pickle_by_their_package_module():
    # Serve's gRPC proxy pickles the request message to the replica: pickle looks the class up by
    # __module__, which must be importable (a bare "twotower_v1_pb2" is not)
    from twotower.protos import pb2

    assert pb2.GenerateRequest.__module__ == "twotower.protos.twotower_v1_pb2"
    msg = pb2.GenerateRequest(prompt_text="hi", sampling=pb2.SamplingParams(gamma=0.5))
    assert pickle.loads(pickle.dumps(msg)) == msg
