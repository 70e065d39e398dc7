"""The command-line client, run as a learner runs it: replies, and errors in one line."""

import subprocess
import sys

import pytest

from helpers import STEP_DIR, run_client, start_client
from tests.support.helpers import closed_port, silent_port
from tools.processes import ServerProcess


def test_client_prints_the_reply(shared_server_process):
    result = run_client("hello", "--name", "Ada", "--target", shared_server_process.address)
    assert (result.returncode, result.stdout, result.stderr) == (0, "Hello, Ada!\n", "")


def test_client_reports_an_rpc_error_in_one_line(shared_server_process):
    result = run_client("hello", "--name", "", "--target", shared_server_process.address)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "error: INVALID_ARGUMENT: name must not be empty\n"


def test_client_reports_a_server_that_is_down():
    with closed_port() as address:
        result = run_client("hello", "--name", "Ada", "--target", address)
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert result.stderr.count("\n") == 1, "one line, no traceback"


def test_client_gives_up_on_a_stuck_server_at_its_deadline():
    with silent_port() as address:
        result = run_client(
            "hello", "--name", "Ada", "--target", address, "--timeout", "0.5", timeout=10
        )
    assert result.returncode == 1
    assert result.stderr.startswith("error: DEADLINE_EXCEEDED: ")


def test_client_prints_stream_replies_as_they_arrive():
    """The first reply is on the client's stdout while the stream is still running."""
    with ServerProcess(STEP_DIR, "--stream-interval", "0.3") as server:
        client = start_client("stream", "--name", "Ada", "--count", "3", "--target", server.address)
        first = client.stdout.readline()
        still_running = client.poll() is None
        rest, errors = client.communicate(timeout=10)
    assert first == "Hello, Ada! (1/3)\n"
    assert still_running, "the client printed nothing until the stream ended"
    assert rest == "Hello, Ada! (2/3)\nHello, Ada! (3/3)\n"
    assert (client.returncode, errors) == (0, "")


def test_client_reports_a_stream_error_in_one_line(shared_server_process):
    result = run_client(
        "stream", "--name", "Ada", "--count", "11", "--target", shared_server_process.address
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: count must be between 1 and 10")
    assert result.stderr.count("\n") == 1


def test_client_uses_the_target_from_the_environment(shared_server_process):
    result = run_client(
        "hello", "--name", "Ada", env={"GREETER_TARGET": shared_server_process.address}
    )
    assert result.stdout == "Hello, Ada!\n"


@pytest.mark.parametrize(
    "command", [["server.py"], ["client.py", "hello", "--name", "Ada"]], ids=lambda c: c[0]
)
def test_a_python_outside_the_virtual_env_says_what_to_do_in_one_line(command):
    """`python -S` leaves site-packages out: a python without the project's packages, as in
    a terminal where the virtual env is not active. One line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-S", *command], cwd=STEP_DIR, capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and line.endswith(
        " has no grpc: activate the project's virtual env first (`source ../.venv/bin/activate`"
        " in a step folder; `make venv` at the repository root makes it)"
    )
