"""Every tool stops what it started, whatever stops it: SIGINT (Ctrl-C), SIGTERM (`kill`) or
SIGHUP (a closed terminal) leave no process behind, and a tool that cannot start says why in
one line and exits non-zero, without a traceback. (The trace receiver, which starts no
process, prints its traces and frees its port.) Each tool runs as a learner runs it, in a
session of its own, so the test can see every process it started."""

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from tests.support.helpers import wait_until
from tools.processes import ServerProcess, demo_environment, free_port, group_alive
from tools.steps import ROOT

STOPS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
SYS_TGKILL = 234  # x86-64 Linux
STEP_08 = ROOT / "step-08_prometheus"
STEP_17 = ROOT / "step-17_versioned_canary"


def family(pid: int) -> set[int]:
    """`pid` and every process below it, now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        found.add(current := todo.pop())
        todo += children.get(current, [])
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def start_tool(
    args: list[str],
    cwd: Path,
    ready: str,
    timeout: float = 30,
    keys: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """`python tools/NAME args` in a session of its own, once it has printed `ready`; and
    what it printed until then. With `keys`, the test types into its stdin; `env` is added
    to the environment."""
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdin=subprocess.PIPE if keys else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,  # what select() sees is all there is: no lines waiting in a buffer
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        return process, read_until(process, ready, timeout)
    except BaseException:
        stop_group(process)
        raise


def stop_group(process: subprocess.Popen) -> None:
    """What a test does when a tool fails it: nothing of the tool's may outlive the test."""
    if group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def assert_stops_everything(process: subprocess.Popen, stop: signal.Signals, expected_code: int):
    started = family(process.pid)
    try:
        assert len(started) > 1, "the tool had started nothing yet"
        process.send_signal(stop)  # to the tool alone, as `kill` does
        assert process.wait(30) == expected_code
        wait_until(
            lambda: not any(running(pid) for pid in started) and not group_alive(process.pid),
            timeout=10,
            message="every process the tool started, and its whole group, to end",
        )
    finally:
        stop_group(process)


@pytest.mark.parametrize("stop", STOPS, ids=lambda s: s.name)
def test_the_broker_tool_stops_tansu_and_moto(stop):
    port = free_port()
    tool, _ = start_tool(
        ["tools/broker.py", "--port", str(port)], ROOT, f"kafka on 127.0.0.1:{port}"
    )
    assert_stops_everything(tool, stop, expected_code=0)


async def test_enter_stops_the_broker_tool_and_starts_it_again_with_its_log():
    """What step 16's README has a learner do: Enter in the broker's terminal stops it, Enter
    again starts it on the same port, with every event and committed offset of before."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    tool, _ = start_tool(
        ["tools/broker.py", "--port", str(port)], ROOT, "Ctrl-C ends it", keys=True
    )
    try:
        partition = TopicPartition("greetings", 0)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for n in range(3):
                await producer.send_and_wait("greetings", f"e{n}".encode(), partition=0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="logger")
        consumer.assign([partition])
        await consumer.start()
        try:
            await consumer.commit({partition: 2})
        finally:
            await consumer.stop()
        press_enter(tool)
        read_until(tool, "kafka stopped (its log is kept); Enter starts it again\n")
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, "the broker still listens"
        press_enter(tool)
        read_until(tool, f"kafka on {bootstrap} again, with its log\n")
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="logger")
        consumer.assign([partition])
        await consumer.start()
        try:
            assert await consumer.committed(partition) == 2
            await consumer.seek_to_beginning(partition)
            records = await consumer.getmany(partition, timeout_ms=10000)
        finally:
            await consumer.stop()
        assert [r.value for r in records[partition]] == [b"e0", b"e1", b"e2"]
    except BaseException:
        stop_group(tool)
        raise
    assert_stops_everything(tool, signal.SIGINT, expected_code=0)


def press_enter(tool: subprocess.Popen) -> None:
    tool.stdin.write(b"\n")
    tool.stdin.flush()


@pytest.mark.parametrize("stop", STOPS, ids=lambda s: s.name)
def test_the_prometheus_tool_stops_prometheus(stop):
    port = free_port()
    tool, _ = start_tool(
        ["../tools/prometheus.py", "--port", str(port), "greeter:9464=127.0.0.1:1"],
        STEP_08,
        f"prometheus on http://127.0.0.1:{port}",
    )
    assert_stops_everything(tool, stop, expected_code=0)


@pytest.mark.parametrize("stop", STOPS, ids=lambda s: s.name)
def test_the_trace_receiver_prints_each_finished_trace_as_a_tree_and_stops(stop):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    tool, _ = start_tool(
        ["tools/otlp_receiver.py", "--port", str(port), "--quiet", "0.3"],
        ROOT,
        f"traces on {endpoint}",
    )
    try:
        provider = TracerProvider(resource=Resource.create({"service.name": "demo"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint, insecure=True)))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("outer") as outer:
            with tracer.start_as_current_span("inner", kind=SpanKind.CLIENT):
                pass
        provider.shutdown()
        trace_id = format(outer.get_span_context().trace_id, "032x")
        printed = read_until(tool, "demo: CLIENT inner")
        assert f"trace {trace_id} (2 spans)\ndemo: INTERNAL outer " in printed, printed
        assert "\n  demo: CLIENT inner " in printed, printed
        tool.send_signal(stop)
        assert tool.wait(30) == 0
    finally:
        stop_group(tool)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free again


def read_until(process: subprocess.Popen, text: str, timeout: float = 30) -> str:
    """What `process` prints until `text` (the test fails after `timeout` without it)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or process.poll() is not None:
            pytest.fail(f"no {text!r} within {timeout}s:\n{seen.decode()}")
        if select.select([process.stdout], [], [], left)[0]:
            seen += os.read(process.stdout.fileno(), 65536)
    return seen.decode()


@pytest.mark.parametrize(
    ("label", "stop"),
    [("08", signal.SIGHUP), ("16", signal.SIGINT), ("17", signal.SIGTERM)],
    ids=["08-SIGHUP", "16-SIGINT", "17-SIGTERM"],
)
def test_up_holds_a_steps_stack_for_the_commands_it_prints_until_stopped(label, stop, tmp_path):
    # up keeps its folder (logs, certificates, tokens) for the learner to read: here it is
    # made in the test's own temporary folder, which pytest removes.
    tool, printed = start_tool(
        ["tools/up.py", label], ROOT, "Ctrl-C stops everything", 90, env={"TMPDIR": str(tmp_path)}
    )
    try:
        commands = printed.split("try, in another terminal, from the repository's root:\n")[1]
        cd, export, hello = [line.strip() for line in commands.splitlines()[:3]]
        venv = str(Path(sys.executable).parent)  # `python` is the venv's, as after activate
        said = subprocess.run(
            ["bash", "-c", f"{cd} && {export} && {hello}"],
            cwd=ROOT,
            env={**os.environ, "PATH": f"{venv}:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert said.stdout == "Hello, Ada!\n", said
        if "prometheus  http" in printed:
            url = printed.split("prometheus  ")[1].split()[0]
            with urllib.request.urlopen(f"{url}/-/ready", timeout=10) as ready:
                assert ready.status == 200
        if "traces      http" in printed:  # the greeting's trace, printed by up
            read_until(tool, "  greeter: SERVER greeter.v1.Greeter/SayHello ")
    except BaseException:
        stop_group(tool)
        raise
    assert_stops_everything(tool, stop, expected_code=0)


@pytest.fixture(scope="module")
def step_17_with_certs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder like step 17's for tools/envoy.py (deploy/envoy.yaml and certs/), and the
    settings that give a Greeter the same certificates."""
    folder = tmp_path_factory.mktemp("step-17")
    (folder / "deploy").mkdir()
    (folder / "deploy" / "envoy.yaml").write_text((STEP_17 / "deploy" / "envoy.yaml").read_text())
    return folder, demo_environment(STEP_17, folder)


@pytest.mark.parametrize("stop", STOPS, ids=lambda s: s.name)
def test_the_envoy_tool_stops_envoy(stop, step_17_with_certs):
    folder, env = step_17_with_certs
    with ServerProcess(STEP_17, env=env) as greeter:
        port = free_port()
        upstreams = [f"{name}={greeter.address}" for name in ("greeter", "greeter-2", "greeter-3")]
        envoy = [
            str(ROOT / "tools/envoy.py"),
            "--port",
            str(port),
            "--admin-port",
            str(free_port()),
        ]
        tool, _ = start_tool([*envoy, *upstreams], folder, f"envoy on 127.0.0.1:{port}")
        assert_stops_everything(tool, stop, expected_code=0)


def run_tool_to_its_end(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def assert_one_line(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.splitlines()
    for part in parts:
        assert part in line, line


def test_a_tool_on_a_port_that_is_taken_says_so_in_one_line(step_17_with_certs):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        broker = run_tool_to_its_end(["tools/broker.py", "--port", port], ROOT)
        prometheus = run_tool_to_its_end(
            ["../tools/prometheus.py", "--port", port, "greeter:9464=127.0.0.1:1"], STEP_08
        )
        envoy = run_tool_to_its_end(
            [str(ROOT / "tools/envoy.py"), "--port", port, "greeter=127.0.0.1:1"],
            step_17_with_certs[0],
        )
        receiver = run_tool_to_its_end(["tools/otlp_receiver.py", "--port", port], ROOT)
    for result in (broker, prometheus, envoy, receiver):
        assert_one_line(result, f"port {port} is taken", "--port")


def test_envoy_whose_upstream_is_down_names_it_in_one_line(step_17_with_certs):
    folder, env = step_17_with_certs
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    with ServerProcess(STEP_17, env=env) as greeter:
        upstreams = {"greeter": greeter.address, "greeter-2": down, "greeter-3": greeter.address}
        result = run_tool_to_its_end(
            [str(ROOT / "tools/envoy.py"), "--port", str(free_port()), "--admin-port"]
            + [str(free_port()), "--wait", "2"]
            + [f"{name}={address}" for name, address in upstreams.items()],
            folder,
        )
    assert_one_line(result, f"greeter-2 at {down}: no health check passed within 2s")


def test_the_tour_stops_the_servers_and_the_broker_of_the_step_it_is_in():
    tour, _ = start_tool(["tools/tour.py", "16"], ROOT, "listening on")
    assert_stops_everything(tour, signal.SIGTERM, expected_code=130)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_the_test_runner_stops_each_pytest_and_what_its_tests_started(tmp_path, stop):
    """A step whose test has started a server (here: a process that would run for 10
    minutes) and waits: stopping the runner stops pytest and that process too."""
    started = tmp_path / "started"
    step = tmp_path / "step-01_one"
    step.mkdir()
    (step / "test_waits.py").write_text(
        "import subprocess, sys, time\n\n\n"
        "def test_waits():\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
    )
    runner = subprocess.Popen(
        [sys.executable, str(ROOT / "tools/run_tests.py"), "--root", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(started.exists, timeout=30, message="the test to start its process")
        wait_until(lambda: len(family(runner.pid)) >= 3, message="pytest and its process")
    except BaseException:
        stop_group(runner)
        raise
    assert_stops_everything(runner, stop, expected_code=130)


def test_a_step_the_bench_serves_stops_with_its_servers_on_sighup():
    bench, _ = start_tool(["tools/bench.py", "serve", "06"], ROOT, "Ctrl-C stops the step.")
    assert_stops_everything(bench, signal.SIGHUP, expected_code=0)


def signal_a_thread_other_than_the_main_one(pid: int, stop: signal.Signals) -> None:
    """`stop` to one of `pid`'s threads that is not its main thread (tgkill), as the kernel
    may choose for a signal sent to the process."""
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert others, "the tool has no other thread"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, others[0], stop) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.parametrize(
    ("command", "ready"),
    [
        (["tools/bench.py", "serve", "06"], "Ctrl-C stops the step."),
        (["tools/up.py", "06"], "Ctrl-C stops everything"),
    ],
    ids=["bench-serve", "up"],
)
def test_a_stop_signal_that_lands_on_another_thread_still_stops_the_tool(command, ready):
    """A tool waiting for Ctrl-C in its main thread is stopped by a signal the kernel hands
    to one of its other threads (an output reader): tools.processes.until_stopped."""
    tool, _ = start_tool(command, ROOT, ready)
    try:
        signal_a_thread_other_than_the_main_one(tool.pid, signal.SIGHUP)
        assert tool.wait(30) == 0
    finally:
        stop_group(tool)


@pytest.mark.parametrize("stop", STOPS, ids=[s.name for s in STOPS])
def test_the_manifests_tool_stops_the_checker_it_runs(stop):
    """Stopped while kubectl, kubernetes-validate or checkov runs: nothing of it stays."""
    process = subprocess.Popen(
        [sys.executable, "tools/manifests.py", "20"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: len(family(process.pid)) > 1, message="a checker running")
        assert_stops_everything(process, stop, 130)
    finally:
        stop_group(process)
