"""The command-line client, run as a learner runs it: replies, and errors in one line."""

import os
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
    # The error's line, then (step 21) each field its BadRequest names.
    assert (
        result.stderr
        == "error: INVALID_ARGUMENT: name must not be empty\n  name: must not be empty\n"
    )


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
    assert result.stderr.splitlines()[1:] == [  # step 21: the field, from the BadRequest
        "  count: must be between 1 and 10 (got 11); 0 or unset means 5"
    ]


def test_client_greets_many_names_in_one_reply(shared_server_process):
    result = run_client(
        "many",
        "--name",
        "Ada",
        "--name",
        "Grace",
        "--name",
        "Alan",
        "--target",
        shared_server_process.address,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "Hello, Ada, Grace and Alan!\n",
        "",
    )


def test_client_sends_many_names_line_by_line_from_stdin(shared_server_process):
    result = run_client("many", "--target", shared_server_process.address, input="Ada\n\nGrace\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "Hello, Ada and Grace!\n", "")


@pytest.mark.parametrize("command", ["many", "chat"])
def test_client_reads_names_from_a_file_on_stdin(shared_server_process, tmp_path, command):
    """`python client.py many < names.txt`: a file is not a pipe (the event loop cannot watch
    it), and /dev/null ends at once."""
    names = tmp_path / "names.txt"
    names.write_text("Ada\n\nGrace\n")
    with names.open() as stdin:
        result = run_client(command, "--target", shared_server_process.address, stdin=stdin)
    replies = {"many": "Hello, Ada and Grace!\n", "chat": "Hello, Ada!\nHello, Grace!\n"}
    assert (result.returncode, result.stdout, result.stderr) == (0, replies[command], "")
    with open(os.devnull) as nothing:
        result = run_client(command, "--target", shared_server_process.address, stdin=nothing)
    if command == "many":  # no name at all: the server says what to do
        assert result.stderr.startswith("error: INVALID_ARGUMENT: GreetMany needs at least one")
    else:  # a chat without messages ends cleanly
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_client_reports_a_refused_name_of_many_in_one_line(shared_server_process):
    names = ["Ada", "", *[f"guest {number}" for number in range(50)]]
    result = run_client(
        "many", *[f"--name={name}" for name in names], "--target", shared_server_process.address
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert (
        result.stderr
        == "error: INVALID_ARGUMENT: name must not be empty\n  name: must not be empty\n"
    )


def test_client_chats_with_each_message_option(shared_server_process):
    result = run_client(
        "chat", "--message", "Ada", "--message", "Grace", "--target", shared_server_process.address
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "Hello, Ada!\nHello, Grace!\n",
        "",
    )


def test_client_chats_line_by_line_from_stdin(shared_server_process):
    result = run_client("chat", "--target", shared_server_process.address, input="Ada\n\nGrace\n")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "Hello, Ada!\nHello, Grace!\n",
        "",
    )


def test_client_reports_a_chat_error_in_one_line(shared_server_process):
    result = run_client(
        "chat",
        "--message",
        "Ada",
        "--message",
        "Ada\tLovelace",
        "--message",
        "Grace",
        "--target",
        shared_server_process.address,
    )
    assert result.returncode == 1
    assert result.stdout == "Hello, Ada!\n"
    printable = "must be printable text (no control characters such as newlines)"
    assert result.stderr == f"error: INVALID_ARGUMENT: name {printable}\n  name: {printable}\n"


def test_client_uses_the_target_from_the_environment(shared_server_process):
    result = run_client(
        "hello", "--name", "Ada", env={"GREETER_TARGET": shared_server_process.address}
    )
    assert result.stdout == "Hello, Ada!\n"


def test_client_reports_a_chat_the_server_ended_between_two_lines_in_one_line():
    """The user types a line, the server shuts down (its chat is cut when the grace runs
    out), then the user types another line: one line of error, no traceback."""
    with ServerProcess(STEP_DIR, "--grace", "0") as server:
        client = start_client("chat", "--target", server.address, stdin=subprocess.PIPE)
        client.stdin.write("Ada\n")
        client.stdin.flush()
        assert client.stdout.readline() == "Hello, Ada!\n"
        assert server.stop() == 0
    output, errors = client.communicate("Grace\n", timeout=10)
    assert (client.returncode, output) == (1, "")
    assert errors.startswith("error: UNAVAILABLE: ") and errors.count("\n") == 1, errors


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
