"""Settings: flags win over environment variables, which win over the defaults; a bad value
is refused at start-up with a message that names where it came from."""

import pytest

from helpers import STEP_DIR, run_client
from settings import Settings, parse_settings
from tools.processes import ServerProcess, run_script


def test_flags_win_over_the_environment_which_wins_over_the_defaults():
    environ = {"GREETER_PORT": "6000", "GREETER_SHUTDOWN_GRACE": "3"}
    assert parse_settings([], environ={}) == Settings()
    assert parse_settings([], environ=environ) == Settings(port=6000, grace=3.0)
    assert parse_settings(["--port", "7000"], environ=environ) == Settings(port=7000, grace=3.0)


def test_an_empty_environment_variable_means_the_default():
    assert parse_settings([], environ={"GREETER_PORT": ""}) == Settings()


def test_server_rejects_a_bad_port_setting():
    result = run_script(STEP_DIR, "server.py", env={"GREETER_PORT": "http"})
    assert result.returncode == 2
    assert "error: GREETER_PORT='http': a port is a number from 0 to 65535" in result.stderr
    assert "--port" not in result.stderr.splitlines()[-1], "names a flag the user never passed"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "70000"], {}, "argument --port: '70000': a port is a number from 0 to 65535"),
        (["--port", "-1"], {}, "argument --port: '-1': a port is a number from 0 to 65535"),
        (["--grace", "-1"], {}, "argument --grace: '-1': seconds must be zero or more"),
        (
            [],
            {"GREETER_SHUTDOWN_GRACE": "-1"},
            "GREETER_SHUTDOWN_GRACE='-1': seconds must be zero or more",
        ),
        (
            [],
            {"GREETER_SHUTDOWN_GRACE": "soon"},
            "GREETER_SHUTDOWN_GRACE='soon': a number of seconds",
        ),
        (["--log-level", "loud"], {}, "argument --log-level: 'loud': one of DEBUG, INFO"),
        ([], {"GREETER_LOG_LEVEL": "loud"}, "GREETER_LOG_LEVEL='loud': one of DEBUG, INFO"),
    ],
    ids=[
        "port-too-big",
        "port-negative",
        "grace-negative",
        "grace-env-negative",
        "grace-env-text",
        "log-level",
        "log-level-env",
    ],
)
def test_server_refuses_out_of_range_settings(args, env, message):
    result = run_script(STEP_DIR, "server.py", *args, env=env)
    assert (result.returncode, result.stdout) == (2, "")  # never "listening on"
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--timeout", "-1"], {}), (["--timeout", "0"], {}), ([], {"GREETER_TIMEOUT": "-5"})],
    ids=["negative", "zero", "env-negative"],
)
def test_client_refuses_a_timeout_that_is_not_positive(args, env):
    result = run_client("hello", "--name", "Ada", *args, env=env)
    assert result.returncode == 2
    assert "seconds must be" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_log_level_is_a_setting(how):
    """At WARNING the server writes none of its INFO lines (one per RPC from step 04 on)."""
    args, env = (
        (["--log-level", "WARNING"], {})
        if how == "flag"
        else ([], {"GREETER_LOG_LEVEL": "warning"})
    )
    with ServerProcess(STEP_DIR, *args, env=env) as server:
        assert run_client("hello", "--name", "Ada", "--target", server.address).returncode == 0
    assert server.returncode == 0
    assert server.output.splitlines() == [
        f"metrics on {server.addresses['metrics']}",
        f"listening on {server.address}",
    ]


def test_the_default_log_level_is_info():
    with ServerProcess(STEP_DIR) as server:
        pass
    assert " INFO greeter.server: stopped" in server.output
