"""The Greeter over REST and JSON through a real Envoy (deploy/envoy.yaml, its JSON transcoder
reading deploy/greeter.pb), in front of the releases compose runs: every mapped RPC, the
errors as HTTP statuses with JSON bodies, the limits, a stopped Greeter, the canary split,
gRPC-Web, the README's curl commands, and the page in a real headless Chromium."""

import asyncio
import base64
import collections
import concurrent.futures
import hashlib
import http.client
import json
import os
import shutil
import signal
import ssl
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from greeter.v1 import greeter_pb2
from helpers import CERTS, STEP_DIR, TEST_TOKEN, TEST_USER, binomial_bounds, releases_behind_envoy
from tests.support.helpers import eventually, require_binary
from tests.support.readme import console_commands
from tools.envoy import RELEASES

*STABLE, CANARY = (settings["GREETER_REPLICA_NAME"] for settings in RELEASES.values())
DESCRIPTOR_SET = STEP_DIR / "deploy" / "greeter.pb"
CHROMIUM_HINT = "sudo apt-get install chromium-headless-shell (Debian/Ubuntu)"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self):
        return json.loads(self.body)


def tls() -> ssl.SSLContext:
    """Trusting the CA gen_certs.sh made, as `curl --cacert certs/ca.crt` does."""
    return ssl.create_default_context(cafile=CERTS / "ca.crt")


def call(
    address: str,
    path: str,
    body: object = None,
    *,
    token: str | None = TEST_TOKEN,
    user: str | None = TEST_USER,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    raw: bytes | None = None,
) -> Answer:
    """One HTTP/1.1 request to Envoy over TLS: `body` as JSON (or `raw` bytes), with the
    Greeter's token and a user id unless told otherwise."""
    sent = {"content-type": "application/json", **(headers or {})}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    if user is not None:
        sent["x-user-id"] = user
    payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
    port = int(address.rsplit(":", 1)[1])
    connection = http.client.HTTPSConnection("localhost", port, context=tls(), timeout=30)
    try:
        connection.request(method, path, body=payload, headers=sent)
        response = connection.getresponse()
        return Answer(
            response.status,
            {name.lower(): value for name, value in response.getheaders()},
            response.read(),
        )
    finally:
        connection.close()


def hello_v2(given: str, family: str = "") -> dict:
    return {"person": {"givenName": given, "familyName": family}}


@pytest.fixture(scope="module")
def gateway():
    """The releases and Envoy, shared by the tests of this module that change nothing."""
    with releases_behind_envoy() as releases:
        yield releases


def test_the_api_maps_every_rpc_but_chat_to_http():
    """The google.api.http options as Envoy reads them, from the descriptor set `make protos`
    generated (tests/test_codegen.py checks that it is fresh)."""
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    mapped = {}
    for file in descriptors.file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                key = f"{file.package}.{service.name}/{method.name}"
                mapped[key] = f"{rule.WhichOneof('pattern')} {rule.post} body={rule.body}"
    assert mapped == {
        "greeter.v1.Greeter/SayHello": "post /v1/greetings body=*",
        "greeter.v1.Greeter/StreamGreetings": "post /v1/greetings:stream body=*",
        "greeter.v1.Greeter/GreetMany": "post /v1/greetings:batch body=*",
        "greeter.v1.Greeter/Chat": "None  body=",
        "greeter.v2.GreeterService/SayHello": "post /v2/greetings body=*",
        "greeter.v2.GreeterService/StreamGreetings": "post /v2/greetings:stream body=*",
        "greeter.v2.GreeterService/GreetMany": "post /v2/greetings:batch body=*",
        "greeter.v2.GreeterService/Chat": "None  body=",
    }


def test_say_hello_over_rest_in_v1_and_v2(gateway):
    v1 = call(gateway.envoy.address, "/v1/greetings", {"name": "Ada"})
    assert (v1.status, v1.json()) == (200, {"message": "Hello, Ada!"})
    assert v1.headers["content-type"] == "application/json"
    v2 = call(gateway.envoy.address, "/v2/greetings", hello_v2("Ada", "Lovelace"))
    assert (v2.status, v2.json()) == (200, {"message": "Hello, Ada Lovelace!"})
    # Field names as proto3's JSON mapping spells them; the proto's own are accepted too.
    snake = call(gateway.envoy.address, "/v2/greetings", {"person": {"given_name": "Grace"}})
    assert (snake.status, snake.json()) == (200, {"message": "Hello, Grace!"})


def test_a_stream_comes_as_a_json_array_each_reply_as_it_is_sent(gateway):
    """Envoy writes `[`, then each reply as the Greeter sends it, then `]`: read as it
    arrives, the body comes in pieces, one reply in each (the releases send one every
    0.5 s), and the pieces together are the JSON array."""
    port = int(gateway.envoy.address.rsplit(":", 1)[1])
    connection = http.client.HTTPSConnection("localhost", port, context=tls(), timeout=30)
    body = json.dumps({"name": "Ada", "count": 3})
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {TEST_TOKEN}",
        "x-user-id": TEST_USER,
    }
    connection.request("POST", "/v1/greetings:stream", body=body, headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    pieces = []
    while piece := response.read1(65536):
        pieces.append(piece.decode())
    connection.close()
    replies = [f'{{"message":"Hello, Ada! ({n}/3)"}}' for n in (1, 2, 3)]
    assert "".join(pieces) == "[" + ",".join(replies) + "]"
    with_a_reply = [piece for piece in pieces if "message" in piece]
    assert len(with_a_reply) == 3, pieces


def test_greet_many_takes_a_json_array_one_element_per_message(gateway):
    names = [{"name": name} for name in ("Ada", "Grace", "Alan")]
    answer = call(gateway.envoy.address, "/v1/greetings:batch", names)
    assert (answer.status, answer.json()) == (200, {"message": "Hello, Ada, Grace and Alan!"})
    people = [hello_v2("Ada", "Lovelace")["person"], {"givenName": "Grace"}]
    v2 = call(gateway.envoy.address, "/v2/greetings:batch", [{"person": p} for p in people])
    assert (v2.status, v2.json()) == (200, {"message": "Hello, Ada Lovelace and Grace!"})
    empty = call(gateway.envoy.address, "/v1/greetings:batch", [])
    assert empty.status == 400, empty.body
    assert empty.json()["code"] == 3


def test_chat_and_unknown_paths_have_no_rest_form(gateway):
    """404 with a JSON body saying so; JSON sent to a gRPC path is not a gRPC call either."""
    for path in ("/v1/greetings:chat", "/v3/greetings", "/greeter.v1.Greeter/Chat"):
        answer = call(gateway.envoy.address, path, [{"name": "Ada"}])
        assert answer.status == 404, (path, answer.body)
        assert answer.json() == {
            "code": 5,
            "message": f"no RPC is mapped to POST {path}: see the API's paths in the step's README",
        }
    # The page is the one GET there is.
    assert call(gateway.envoy.address, "/v1/greetings", method="GET").status == 404


@pytest.mark.parametrize(
    ("token", "user", "message"),
    [
        (None, TEST_USER, "missing authorization metadata: send 'authorization: Bearer <token>'"),
        ("not-the-token", TEST_USER, "invalid token"),
    ],
    ids=["no token", "wrong token"],
)
def test_a_caller_without_credentials_gets_401(gateway, token, user, message):
    answer = call(gateway.envoy.address, "/v2/greetings", hello_v2("Ada"), token=token, user=user)
    assert answer.status == 401
    assert answer.json() == {"code": 16, "message": message, "details": []}


@pytest.mark.parametrize(
    ("path", "body", "field", "description", "reason"),
    [
        ("/v1/greetings", {"name": ""}, "name", "must not be empty", "NAME_NOT_BLANK"),
        (
            "/v1/greetings",
            {"name": "x" * 101},
            "name",
            "must be at most 100 characters (got 101)",
            "NAME_MAX_LEN",
        ),
        (
            "/v1/greetings:stream",
            {"name": "Ada", "count": 11},
            "count",
            "must be between 1 and 10 (got 11); 0 or unset means 5",
            "COUNT_RANGE",
        ),
        (
            "/v2/greetings",
            {"person": {}},
            "person.given_name",
            "must not be empty",
            "NAME_NOT_BLANK",
        ),
    ],
    ids=["empty name", "long name", "count", "no given name"],
)
def test_bad_input_gets_400_with_the_greeters_message(
    gateway, path, body, field, description, reason
):
    """The Greeter's refusal, and since step 21 the fields it names in a BadRequest."""
    answer = call(gateway.envoy.address, path, body)
    assert answer.status == 400
    bad_request = {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": field, "description": description, "reason": reason}],
    }
    message = f"{field} {description}"
    assert answer.json() == {"code": 3, "message": message, "details": [bad_request]}


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        ("/v1/greetings", b'{"name":', "Unexpected end of string. Expected a value.\n\n^"),
        ("/v1/greetings", b'{"name": 7}', "name: invalid value 7 for type TYPE_STRING"),
        ("/v1/greetings", b'{"count": "x"}', 'count: invalid value "x" for type TYPE_INT32'),
        (
            "/v1/greetings?nmae=Ada",
            b'{"name": "Ada"}',
            'Could not find field "nmae" in the type "greeter.v1.HelloRequest".',
        ),
    ],
    ids=["malformed", "number for text", "text for number", "query parameter"],
)
def test_json_envoy_cannot_read_gets_400_before_any_greeter_is_called(gateway, path, raw, message):
    answer = call(gateway.envoy.address, path, raw=raw)
    assert answer.status == 400, answer.body
    assert answer.json() == {"code": 3, "message": message}
    assert "x-served-by" not in answer.headers  # refused at the edge


def test_an_unknown_field_is_dropped_not_refused(gateway):
    """Envoy's transcoder drops JSON fields the message does not have and gives the Greeter
    no sign of them (envoyproxy/envoy#46623: no option refuses them). The README says so:
    a misspelt optional field is ignored, as with grpc-gateway's default."""
    answer = call(gateway.envoy.address, "/v1/greetings", {"name": "Ada", "cuont": 3})
    assert (answer.status, answer.json()) == (200, {"message": "Hello, Ada!"})


def served(releases) -> collections.Counter:
    """How many calls Envoy has sent each Greeter replica (by its replica name), as Envoy
    counts them (a successful REST answer carries none of the Greeter's trailers, so no
    x-served-by: the transcoder keeps only grpc-status and grpc-message)."""
    names = {address: name for name, address in releases.upstreams.items()}
    replica = {name: RELEASES[name]["GREETER_REPLICA_NAME"] for name in RELEASES}
    counts: collections.Counter[str] = collections.Counter()
    for cluster in releases.envoy.cluster_statuses():
        for host in cluster.get("host_statuses", []):
            address = "{address}:{port_value}".format(**host["address"]["socket_address"])
            total = sum(
                int(stat.get("value", 0)) for stat in host["stats"] if stat["name"] == "rq_total"
            )
            counts[replica[names[address]]] += total
    return counts


def test_v1_rest_calls_split_90_10_and_the_canary_header_applies(gateway):
    """The canary split is the route's, and REST calls are routed as gRPC calls are."""

    def greet(headers: dict[str, str] | None = None) -> None:
        answer = call(gateway.envoy.address, "/v1/greetings", {"name": "Ada"}, headers=headers)
        assert answer.status == 200, answer.body

    def calls_served(calls: int, headers: dict[str, str] | None = None) -> collections.Counter:
        before = served(gateway)
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            list(pool.map(lambda _: greet(headers), range(calls)))
        return served(gateway) - before

    split = calls_served(400)
    assert split.total() == 400, split
    low, high = binomial_bounds(400, 0.10)
    assert low <= split[CANARY] <= high, split
    assert all(split[name] > 0 for name in STABLE), split
    assert calls_served(40, {"x-canary": "always"}) == {CANARY: 40}
    before = served(gateway)
    assert call(gateway.envoy.address, "/v2/greetings", hello_v2("Ada")).status == 200
    assert served(gateway) - before == {CANARY: 1}  # only the canary serves v2


def grpc_web_frame(message: bytes) -> bytes:
    """One gRPC-Web data frame: flag 0, the length (4 bytes, big-endian), the message."""
    return b"\0" + struct.pack(">I", len(message)) + message


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """The messages of a gRPC-Web response body, and its trailers (flag 0x80)."""
    messages, trailers = [], {}
    while body:
        flag, length = body[0], struct.unpack(">I", body[1:5])[0]
        payload, body = body[5 : 5 + length], body[5 + length :]
        if flag & 0x80:
            for line in payload.decode().strip().split("\r\n"):
                name, _, value = line.partition(":")
                trailers[name] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def test_grpc_web_reaches_the_same_greeters(gateway):
    """What a browser's gRPC-Web client sends, by hand: the Greeter's protobuf in gRPC-Web
    frames over HTTP/1.1. Envoy's grpc_web filter makes it a gRPC call."""

    def say_hello(name: str) -> Answer:
        message = greeter_pb2.HelloRequest(name=name).SerializeToString()
        return call(
            gateway.envoy.address,
            "/greeter.v1.Greeter/SayHello",
            raw=grpc_web_frame(message),
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
        )

    answer = say_hello("Ada")
    assert (answer.status, answer.headers["content-type"]) == (200, "application/grpc-web+proto")
    messages, trailers = grpc_web_frames(answer.body)
    assert [greeter_pb2.HelloReply.FromString(m).message for m in messages] == ["Hello, Ada!"]
    assert trailers["grpc-status"] == "0"
    refused = say_hello("")  # an error has no message: its status is in the headers
    assert (refused.status, refused.body) == (200, b"")
    assert refused.headers["grpc-status"] == "3"
    assert refused.headers["grpc-message"] == "name must not be empty"


async def test_the_greeters_rate_limit_is_a_429_with_retry_after():
    """The Greeter's own limit (step 18): RESOURCE_EXHAUSTED becomes 429, its RetryInfo and
    QuotaFailure are in the JSON body, and the Greeter's retry-after metadata is HTTP's
    Retry-After header."""
    limited = {"GREETER_RATE_LIMIT": "1", "GREETER_RATE_BURST": "2"}
    with releases_behind_envoy(env=limited) as releases:
        answers = []
        for _ in range(10):  # the bucket holds 2 and refills 1 a second: it runs dry
            answer = await asyncio.to_thread(
                call, releases.envoy.address, "/v2/greetings", hello_v2("Ada"), user="bob"
            )
            answers.append(answer)
            if answer.status != 200:
                break
    assert [a.status for a in answers[:2]] == [200, 200]
    refused = answers[-1]
    assert refused.status == 429, refused.body
    body = refused.json()
    assert body["code"] == 8
    assert body["message"].startswith("rate limit of user bob (1 call a second, 2 at once): ")
    retry_info, quota_failure = body["details"]
    assert retry_info["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
    delay = float(retry_info["retryDelay"].removesuffix("s"))
    assert 0 < delay <= 1
    assert refused.headers["retry-after"] == "1"  # whole seconds, rounded up
    assert quota_failure["violations"][0]["subject"] == "user bob"


async def test_the_edge_limit_is_a_429_before_any_greeter_is_called():
    """Envoy's own bucket per user (step 18): its refusal is JSON too, with Retry-After."""
    bucket = {"max_tokens": 2, "tokens_per_fill": 1, "fill_interval": "3600s"}
    with releases_behind_envoy(user_bucket=bucket) as releases:
        answers = [
            await asyncio.to_thread(
                call, releases.envoy.address, "/v1/greetings", {"name": "Ada"}, user="eve"
            )
            for _ in range(3)
        ]
        other_user = await asyncio.to_thread(
            call, releases.envoy.address, "/v1/greetings", {"name": "Ada"}, user="frank"
        )
    assert [a.status for a in answers] == [200, 200, 429]
    refused = answers[2]
    assert refused.json() == {
        "code": 8,
        "message": "too many calls from user eve at the edge: retry in 1 s",
    }
    assert refused.headers["retry-after"] == "1"
    assert "x-served-by" not in refused.headers  # no Greeter saw it
    assert other_user.status == 200


async def test_a_stopped_greeter_is_a_503_and_rest_calls_recover_when_it_is_back():
    """v2 has one replica, the canary. Killed, its REST callers get 503 with a JSON body;
    started again where it was, Envoy's health check finds it and calls succeed."""
    with releases_behind_envoy() as releases:
        address = releases.canary.address
        releases.canary.stop(signal.SIGKILL)
        down = await asyncio.to_thread(
            call, releases.envoy.address, "/v2/greetings", hello_v2("Ada")
        )
        assert down.status == 503, down.body
        assert down.json()["code"] == 14
        with releases.canary.restarted() as again:
            assert again.address == address
            await eventually(
                lambda: releases.envoy.healthy("canary_v2")[address],
                timeout=10,
                message="Envoy to see the canary back",
            )
            back = await asyncio.to_thread(
                call, releases.envoy.address, "/v2/greetings", hello_v2("Ada")
            )
    assert (back.status, back.json()) == (200, {"message": "Hello, Ada!"})


def test_readme_curl_commands_work_as_written(gateway, tmp_path):
    """The README's curl commands, run by a shell exactly as written but for Envoy's port,
    from a directory with certs/, with the token in GREETER_AUTH_TOKEN as the README sets."""
    (tmp_path / "certs").symlink_to(CERTS)
    port = gateway.envoy.address.rsplit(":", 1)[1]
    commands = [c for c in console_commands(STEP_DIR / "README.md") if c.argv[0] == "curl"]
    assert len(commands) >= 5
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command.line.replace("localhost:10000", f"localhost:{port}")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "GREETER_AUTH_TOKEN": TEST_TOKEN},
        )
        assert result.stdout + result.stderr == command.expected_output, command.line


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium"):
        if path := shutil.which(name):
            return path
    return require_binary("chromium-headless-shell", CHROMIUM_HINT)


def certificate_pin(certificate: Path) -> str:
    """The base64 SHA-256 of the certificate's public key: Chromium trusts exactly that key
    (--ignore-certificate-errors-spki-list), not every certificate, for the test's CA."""
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    key = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(key).digest()).decode()


def test_the_page_greets_in_a_real_browser(gateway):
    """deploy/web/index.html, served by Envoy, in headless Chromium: a greeting, a stream
    shown greeting by greeting, and the Greeter's refusal of a bad name on the page."""
    from playwright.sync_api import expect, sync_playwright

    port = gateway.envoy.address.rsplit(":", 1)[1]
    pin = certificate_pin(CERTS / "server.crt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), args=[f"--ignore-certificate-errors-spki-list={pin}"]
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"https://localhost:{port}/")
            page.fill("#token", TEST_TOKEN)
            page.click("#hello")
            greetings = page.locator("#greetings li")
            expect(greetings).to_have_text(["Hello, Ada Lovelace!"])
            page.click("#stream")
            expect(greetings).to_have_text([f"Hello, Ada Lovelace! ({n}/3)" for n in (1, 2, 3)])
            expect(page.locator("#error")).to_be_empty()
            page.fill("#given", " ")
            page.click("#hello")
            expect(page.locator("#error")).to_have_text("400: person.given_name must not be empty")
            expect(greetings).to_have_count(0)
            assert errors == []
        finally:
            browser.close()
