"""TLS only, mutual TLS on request: encryption, certificate checks, the calling service."""

import logging
import os
import re
import subprocess
import sys

import grpc
import pytest

from caller import calling_service, current_user_id
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from helpers import (
    CERTS,
    STEP_DIR,
    TEST_USER,
    Request,
    assert_rpc_line,
    open_channel,
    raw_channel,
    rpc_error,
    rpc_records,
    run_client,
)
from service import Greeter
from tests.support.helpers import eventually
from tools.processes import ServerProcess, run_script


class CallerGreeter(Greeter):
    """Answers with what the server knows about the connection and the caller."""

    async def SayHello(self, request, context):
        security = context.auth_context()["transport_security_type"][0].decode()
        return greeter_pb2.HelloReply(
            message=f"security={security} service={calling_service(context)} user={current_user_id()}"
        )


@pytest.fixture
def start_caller_server(start_server):
    """Start a CallerGreeter server with the test settings plus `overrides`; its address."""

    async def start(**overrides) -> str:
        return (await start_server(CallerGreeter, **overrides)).address

    return start


async def who_am_i(channel) -> str:
    return (
        await greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
    ).message


async def test_calls_are_encrypted(start_caller_server):
    address = await start_caller_server()
    async with open_channel(address) as channel:
        assert await who_am_i(channel) == f"security=ssl service=None user={TEST_USER}"


async def test_localhost_is_in_the_certificate_too(server_address):
    port = server_address.rsplit(":", 1)[1]
    async with open_channel(f"localhost:{port}") as channel:
        assert (
            await greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        ).message == ("Hello, Ada!")


def test_the_server_certificate_covers_localhost_and_both_loopback_addresses():
    san = subprocess.run(
        ["openssl", "x509", "-in", str(CERTS / "server.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # ... and the names docker compose gives the two services and their replicas.
    assert (
        "DNS:localhost, DNS:greeter, DNS:logger, DNS:greeters, DNS:loggers, "
        "IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1"
    ) in san


def test_private_keys_are_readable_by_their_owner_only():
    for key in ["ca.key", "server.key", "client.key"]:
        assert (CERTS / key).stat().st_mode & 0o077 == 0, key


async def test_a_plaintext_client_is_refused(server_address):
    async with grpc.aio.insecure_channel(server_address) as channel:
        error = await rpc_error(
            greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_trusting_another_ca_is_refused(server_address, other_certs):
    async with raw_channel(server_address, ca=str(other_certs / "ca.crt")) as channel:
        error = await rpc_error(
            greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in error.details()


async def test_a_name_not_in_the_certificate_is_refused(server_address):
    options = [("grpc.ssl_target_name_override", "not-in-the-certificate.example")]
    async with raw_channel(server_address, options=options) as channel:
        error = await rpc_error(
            greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_without_a_certificate(start_caller_server):
    address = await start_caller_server(tls_client_ca=str(CERTS / "ca.crt"))
    async with open_channel(address) as channel:
        error = await rpc_error(who_am_i(channel))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_certificate_from_another_ca(start_caller_server, other_certs):
    address = await start_caller_server(tls_client_ca=str(CERTS / "ca.crt"))
    foreign = {"cert": str(other_certs / "client.crt"), "key": str(other_certs / "client.key")}
    async with raw_channel(address, **foreign) as channel:
        error = await rpc_error(who_am_i(channel))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_knows_the_calling_service(start_caller_server, caplog):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    address = await start_caller_server(tls_client_ca=str(CERTS / "ca.crt"))
    client_certificate = {"cert": str(CERTS / "client.crt"), "key": str(CERTS / "client.key")}
    async with open_channel(address, **client_certificate) as channel:
        assert await who_am_i(channel) == f"security=ssl service=greeter-client user={TEST_USER}"
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert_rpc_line(record, "SayHello", "OK", user=TEST_USER, client="greeter-client")


def test_client_reports_a_tls_failure_in_one_line(server_process, other_certs):
    result = run_client(
        "hello",
        "--name",
        "Ada",
        "--target",
        server_process.address,
        "--ca",
        str(other_certs / "ca.crt"),
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    # The server saw a failed handshake: an ordinary event, so gRPC's core logs nothing.
    assert server_process.stop() == 0
    assert not re.search(r"^[EIW]\d{4} ", server_process.output, re.MULTILINE), (
        server_process.output
    )


def test_client_with_a_client_certificate_against_a_mutual_tls_server():
    with ServerProcess(STEP_DIR, env={"GREETER_TLS_CLIENT_CA": str(CERTS / "ca.crt")}) as server:
        without = run_client("hello", "--name", "Ada", "--target", server.address)
        with_certificate = run_client(
            "hello",
            "--name",
            "Ada",
            "--target",
            server.address,
            "--cert",
            str(CERTS / "client.crt"),
            "--key",
            str(CERTS / "client.key"),
        )
    assert without.returncode == 1 and without.stderr.startswith("error: UNAVAILABLE: ")
    assert (with_certificate.returncode, with_certificate.stdout) == (0, "Hello, Ada!\n")
    assert " client=greeter-client user=" in server.output


def test_client_without_its_ca_file_says_how_to_make_one(tmp_path):
    result = run_client("hello", "--name", "Ada", "--ca", str(tmp_path / "missing.crt"))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: cannot read the CA certificate {tmp_path / 'missing.crt'}: No such file or directory; "
        "run ./gen_certs.sh to make a local CA and certificates in certs/\n"
    )


def test_client_run_from_another_folder_says_which_folder_to_run_it_from():
    result = subprocess.run(
        [sys.executable, str(STEP_DIR / "client.py"), "hello", "--name", "Ada"],
        cwd=STEP_DIR.parent,  # the repository's root, where certs/ is not
        env={k: v for k, v in os.environ.items() if k != "GREETER_TLS_CA"},  # the default
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: cannot read the CA certificate certs/ca.crt: No such file or directory; "
        f"run it from its step folder (cd {STEP_DIR.name}), where certs/ is\n"
    )


def test_server_without_its_certificate_says_how_to_make_one(tmp_path):
    result = run_script(
        STEP_DIR, "server.py", "--port", "0", "--tls-cert", str(tmp_path / "server.crt")
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "run ./gen_certs.sh" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_with_a_key_that_does_not_match_its_certificate_says_so():
    result = run_script(
        STEP_DIR, "server.py", "--port", "0", env={"GREETER_TLS_KEY": str(CERTS / "client.key")}
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(
        f"error: the TLS key {CERTS / 'client.key'} does not belong to the certificate "
        f"{CERTS / 'server.crt'} (KEY_VALUES_MISMATCH)"
    ), result.stderr
    assert "cannot listen" not in result.stderr


@pytest.fixture(scope="module")
def certificate_for_another_name(tmp_path_factory) -> dict[str, str]:
    """A server certificate from the test CA, valid for elsewhere.example only."""
    directory = tmp_path_factory.mktemp("elsewhere")
    key, request, certificate = (
        directory / name for name in ("server.key", "server.csr", "server.crt")
    )
    (directory / "server.ext").write_text(
        "subjectAltName=DNS:elsewhere.example\nextendedKeyUsage=serverAuth\n"
    )
    for command in (
        ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)],
        ["req", "-new", "-key", str(key), "-subj", "/CN=elsewhere.example", "-out", str(request)],
        [
            "x509",
            "-req",
            "-in",
            str(request),
            "-CA",
            str(CERTS / "ca.crt"),
            "-CAkey",
            str(CERTS / "ca.key"),
            "-set_serial",
            "0x51",
            "-days",
            "1",
            "-extfile",
            str(directory / "server.ext"),
            "-out",
            str(certificate),
        ],
    ):
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    return {"GREETER_TLS_CERT": str(certificate), "GREETER_TLS_KEY": str(key)}


def test_client_refuses_a_server_whose_certificate_names_another_host(certificate_for_another_name):
    """Signed by the CA the client trusts, but for another name than the one it dialled."""
    with ServerProcess(STEP_DIR, env=certificate_for_another_name) as server:
        result = run_client("hello", "--name", "Ada", "--target", server.address)
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: "), result.stderr
    assert "Hostname Verification Check failed" in result.stderr
    assert result.stderr.count("\n") == 1
