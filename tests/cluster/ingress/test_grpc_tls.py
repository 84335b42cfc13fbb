"""The gRPC server over TLS (server_credentials): a client that trusts the CA is served, a plaintext
client is not; with a client CA (mTLS), a client without a certificate signed by it is refused."""

from __future__ import annotations

import grpc
import pytest

from tests.cluster.ingress.test_grpc_service import FakeServer
from tests.cluster.serve.certs import write_test_certs
from twotower.cluster.ingress import grpc_service as gi
from twotower.protos import pb2, pb2_grpc

from .grpc_harness import running_grpc

REQ = pb2.GenerateRequest(prompt_text="hello", sampling=pb2.SamplingParams(max_tokens=3))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca, cert, key = write_test_certs(d)
    return {"ca": ca, "cert": cert, "key": key, "client": (d / "client.key", d / "client.pem")}


def _generate(channel) -> list:
    return list(pb2_grpc.TwoTowerStub(channel).Generate(REQ, timeout=10))


def test_tls_serves_a_client_that_trusts_the_ca_and_no_plaintext_client(certs):
    tls = gi.server_credentials(str(certs["cert"]), str(certs["key"]))
    trusting = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
    with running_grpc(lambda: gi.GrpcIngress(FakeServer()), tls, trusting) as channel:
        assert _generate(channel)[-1].finished
        target = channel.twotower_target
        with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError) as e:
            _generate(plain)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate_the_ca_signed(certs):
    tls = gi.server_credentials(str(certs["cert"]), str(certs["key"]), str(certs["ca"]))
    key, cert = (p.read_bytes() for p in certs["client"])
    with_cert = grpc.ssl_channel_credentials(certs["ca"].read_bytes(), private_key=key, certificate_chain=cert)
    with running_grpc(lambda: gi.GrpcIngress(FakeServer()), tls, with_cert) as channel:
        assert _generate(channel)[-1].finished
        target = channel.twotower_target
        without = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
        with grpc.secure_channel(target, without) as anonymous, pytest.raises(grpc.RpcError) as e:
            _generate(anonymous)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_busy_port_is_an_error_at_build_time():
    import asyncio

    async def main():
        no_reuse = [("grpc.so_reuseport", 0)]
        server, port = gi.build_grpc_server(gi.GrpcIngress(FakeServer()), "127.0.0.1:0", options=no_reuse)
        with pytest.raises(RuntimeError, match="could not bind"):
            gi.build_grpc_server(gi.GrpcIngress(FakeServer()), f"127.0.0.1:{port}", options=no_reuse)
        await server.stop(None)

    asyncio.run(main())
