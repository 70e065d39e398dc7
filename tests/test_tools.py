"""The repo tools fail when they should: the ladder tool on a conflict, the test runner on a
failing or (in CI) skipped test, the tour on a failing demo; and a server the tools restart
comes back at its address; the Kafka-protocol broker keeps its log across a restart. Each runs
on a small scratch repository or its own processes, never on this one."""

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tools.broker import KafkaBroker, S3Server
from tools.envoy import local_config, socket_addresses
from tools.processes import ServerProcess, free_port
from tools.steps import ROOT, find_step


def tool(name: str, *args: str, cwd: Path = ROOT, env: dict | None = None):
    import os

    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


BASE = "def greet(name):\n    return 'Hello, ' + name\n\n\ndef main():\n    print(greet('Ada'))\n"


def ladder_repo(tmp_path: Path) -> Path:
    """Three steps: 02 and 03 each add a line at the end of step 01's service.py."""
    write(tmp_path / "step-01_one/service.py", BASE)
    write(tmp_path / "step-02_two/service.py", BASE + "# step 02\n")
    write(tmp_path / "step-03_three/service.py", BASE + "# step 02\n# step 03\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "steps")
    return tmp_path


def test_propagate_carries_an_uncommitted_fix_into_every_later_step(tmp_path):
    repo = ladder_repo(tmp_path)
    fixed = BASE.replace("'Hello, ' + name", "f'Hello, {name}!'")
    (repo / "step-01_one/service.py").write_text(fixed)
    write(repo / "step-01_one/limits.py", "MAX = 100\n")
    result = tool("ladder.py", "--root", str(repo), "propagate", "01")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (repo / "step-02_two/service.py").read_text() == fixed + "# step 02\n"
    assert (repo / "step-03_three/service.py").read_text() == fixed + "# step 02\n# step 03\n"
    assert (repo / "step-03_three/limits.py").read_text() == "MAX = 100\n"


def test_propagate_carries_the_last_commit_when_nothing_is_uncommitted(tmp_path):
    repo = ladder_repo(tmp_path)
    fixed = BASE.replace("'Hello, ' + name", "'Greetings, ' + name")
    (repo / "step-01_one/service.py").write_text(fixed)
    git(repo, "commit", "-qam", "fix")
    result = tool("ladder.py", "--root", str(repo), "propagate", "01")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the last commit" in result.stdout
    assert (repo / "step-03_three/service.py").read_text() == fixed + "# step 02\n# step 03\n"


def test_propagate_stops_at_the_first_conflict(tmp_path):
    repo = ladder_repo(tmp_path)
    step3 = repo / "step-03_three/service.py"
    step3.write_text(step3.read_text().replace("'Hello, ' + name", "'Hi, ' + name"))
    git(repo, "commit", "-qam", "step 03 says hi")
    (repo / "step-01_one/service.py").write_text(BASE.replace("'Hello, ' + name", "'Hey, ' + name"))
    before = step3.read_text()
    result = tool("ladder.py", "--root", str(repo), "propagate", "01")
    assert result.returncode == 1
    assert "CONFLICT in step-03_three/service.py" in result.stdout
    assert "propagate 03" in result.stdout
    assert "'Hey, ' + name" in (repo / "step-02_two/service.py").read_text()
    assert step3.read_text() == before, "the conflicting step is left untouched"


def test_propagate_with_nothing_to_carry_fails(tmp_path):
    repo = ladder_repo(tmp_path)
    write(repo / "step-03_three/extra.py", "EXTRA = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "only step 03")
    result = tool("ladder.py", "--root", str(repo), "propagate", "01")
    assert result.returncode == 1
    assert "nothing to carry" in result.stdout


def test_diff_and_stats_leave_generated_code_out(tmp_path):
    repo = ladder_repo(tmp_path)
    write(repo / "step-02_two/greeter/v1/greeter_pb2.py", "generated = True\n")
    diff = tool("ladder.py", "--root", str(repo), "diff", "02")
    assert diff.returncode == 0
    assert "+# step 02" in diff.stdout and "greeter_pb2" not in diff.stdout
    stats = tool("ladder.py", "--root", str(repo), "stats")
    assert "01→02" in stats.stdout and "0/1/0" in stats.stdout


def scratch_step(root: Path, test_body: str) -> None:
    write(root / "step-01_scratch/test_scratch.py", test_body)


def test_test_runner_fails_on_a_failing_test(tmp_path):
    scratch_step(tmp_path, "def test_ok():\n    pass\n\n\ndef test_broken():\n    assert 1 == 2\n")
    result = tool("run_tests.py", "--root", str(tmp_path), env={"CI": ""})
    assert result.returncode == 1
    assert "1 passed, 1 failed, 0 skipped" in result.stdout
    # The step's own line comes as it finishes, before the failure's output and the table.
    line = result.stdout.index("step-01_scratch: FAILED (1 failed), 1 passed, 1 failed, 0 skipped")
    assert (
        line < result.stdout.index("===== step-01_scratch FAILED") < result.stdout.index("\nrun ")
    )


def test_test_runner_shows_the_slowest_tests(tmp_path):
    scratch_step(tmp_path, "def test_one():\n    pass\n\n\ndef test_two():\n    pass\n")
    result = tool("run_tests.py", "--root", str(tmp_path), env={"CI": ""})
    slowest = result.stdout.split("the 2 slowest of 2 tests (")[1]
    for name in ("test_one", "test_two"):
        assert f"s  step-01_scratch: test_scratch::{name}\n" in slowest, slowest


def test_test_runner_counts_a_skip_as_a_failure_in_ci(tmp_path):
    scratch_step(
        tmp_path, "import pytest\n\n\ndef test_needs_binary():\n    pytest.skip('no binary')\n"
    )
    assert tool("run_tests.py", "--root", str(tmp_path), env={"CI": ""}).returncode == 0
    result = tool("run_tests.py", "--root", str(tmp_path), env={"CI": "true"})
    assert result.returncode == 1
    assert "skipped (CI=true" in result.stdout


def test_test_runner_fails_when_no_test_runs(tmp_path):
    scratch_step(tmp_path, "# no tests here\n")
    result = tool("run_tests.py", "--root", str(tmp_path), env={"CI": ""})
    assert result.returncode == 1
    assert "no tests ran" in result.stdout


def test_tour_fails_when_a_demo_fails(tmp_path):
    """A step 01 whose server serves but whose client exits 1: the tour must say so."""
    write(
        tmp_path / "step-01_broken/server.py",
        """\
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("listening on 127.0.0.1:1", flush=True)
        signal.pause()
    """,
    )
    write(
        tmp_path / "step-01_broken/client.py",
        "import sys\nsys.exit('error: UNAVAILABLE: broken')\n",
    )
    result = tool("tour.py", "--root", str(tmp_path))
    assert result.returncode == 1
    assert "✗ expected success, got exit code 1" in result.stdout
    assert "tour FAILED at step(s) 01" in result.stdout


def test_a_restarted_server_comes_back_at_its_address_with_its_earlier_output(tmp_path):
    write(
        tmp_path / "server.py",
        """\
        import argparse, signal, socket, sys
        parser = argparse.ArgumentParser()
        parser.add_argument("--port", type=int, action="append")
        port = parser.parse_args().port[-1]  # the last --port wins, as with the steps' servers
        sock = socket.create_server(("127.0.0.1", port))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
        signal.pause()
    """,
    )
    # Below the kernel's ephemeral range, so that nothing takes the port while it is down.
    first = ServerProcess(tmp_path, "--port", str(free_port()))
    with pytest.raises(RuntimeError, match="is still running"):
        first.restarted()
    assert first.stop() == 0
    with first.restarted() as again:
        assert again.address == first.address
        assert again.output.startswith(
            f"listening on {first.address}\n(exit code 0; started again)\nlistening on"
        )


async def test_the_broker_keeps_its_events_and_offsets_across_a_restart():
    """Tansu with its log in moto's S3: what was written and committed before a stop is there
    after the start, on the same port, as with Kafka's own disks."""
    with S3Server() as s3, KafkaBroker(s3) as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            sent = [
                await producer.send_and_wait("t", f"e{n}".encode(), partition=0) for n in range(3)
            ]
        finally:
            await producer.stop()
        partition = TopicPartition("t", 0)
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="g")
        consumer.assign([partition])
        await consumer.start()
        try:
            await consumer.commit({partition: 2})
        finally:
            await consumer.stop()
        broker.stop()
        broker.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap, group_id="g", auto_offset_reset="earliest"
        )
        consumer.assign([partition])
        await consumer.start()
        try:
            assert await consumer.committed(partition) == 2
            await consumer.seek_to_beginning(partition)
            records = await consumer.getmany(partition, timeout_ms=5000)
        finally:
            await consumer.stop()
    assert [r.value for r in records[partition]] == [b"e0", b"e1", b"e2"]
    assert [m.offset for m in sent] == [0, 1, 2]


@pytest.mark.parametrize(("label", "counted"), [("02", "unimplemented"), ("03", "calls")])
def test_bench_tells_an_rpc_a_step_lacks_from_a_failed_call(label, counted):
    """`make bench --against REV` runs GreetMany against steps as they were before it existed:
    UNIMPLEMENTED there means "no such RPC" (a dash in the table), not 5 failed calls."""
    with ServerProcess(find_step(label).path) as server:
        result = tool(
            "bench.py",
            "load",
            "--kind",
            "many",
            "--calls",
            "5",
            "--target",
            server.address,
            "--concurrency",
            "1",
            "--seconds",
            "1",
            "--warmup",
            "0",
        )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert {k: figures[k] for k in ("calls", "unimplemented", "errors")} == {
        "calls": 0,
        "unimplemented": 0,
        "errors": 0,
        counted: 5,
    }


def test_envoy_runs_the_steps_config_with_only_ports_and_upstreams_changed():
    """tools/envoy.py: the routes, clusters, health checks and TLS of deploy/envoy.yaml stay
    as compose runs them; listener and admin move to loopback ports, compose's names become
    the addresses given, and a name left without one is an error, not a silent gap."""
    source = yaml.safe_load(
        (ROOT / "step-17_versioned_canary" / "deploy" / "envoy.yaml").read_text()
    )
    upstreams = {
        "greeter": "127.0.0.1:1001",
        "greeter-2": "127.0.0.1:1002",
        "greeter-3": "[::1]:1003",
    }
    local = local_config(copy.deepcopy(source), upstreams, port=2000, admin_port=2001)
    listener = local["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "127.0.0.1", "port_value": 2000}
    assert local["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 2001,
    }
    addresses = sorted({(a["address"], a["port_value"]) for a in socket_addresses(local)})
    assert addresses == [("127.0.0.1", 1001), ("127.0.0.1", 1002), ("::1", 1003)]
    for kept in ("listeners", "clusters"):
        assert [x["name"] for x in local["static_resources"][kept]] == [
            x["name"] for x in source["static_resources"][kept]
        ]
    assert (
        local["static_resources"]["listeners"][0]["filter_chains"]
        == source["static_resources"]["listeners"][0]["filter_chains"]
    )
    with pytest.raises(ValueError, match="no address given for upstream 'greeter-3'"):
        local_config(
            copy.deepcopy(source), {"greeter": "127.0.0.1:1", "greeter-2": "127.0.0.1:2"}, 1, 2
        )


def test_mutate_reports_the_mutants_a_weak_test_lets_survive(tmp_path):
    """make mutate on a scratch step: `double(2) == 4` cannot tell `x * 2` from `x + 2` or
    `x ** 2`, so those mutants survive and the report shows them; the real step is a copy."""
    step = tmp_path / "step-01_one"
    write(step / "calc.py", "def double(x):\n    return x * 2\n")
    write(
        step / "tests" / "test_calc.py",
        "from calc import double\n\n\ndef test_double():\n    assert double(2) == 4\n",
    )
    result = tool("mutate.py", "--root", str(tmp_path), "01", "calc")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "surviving mutants: 2 (" in result.stdout
    assert "+    return x + 2" in result.stdout and "+    return x ** 2" in result.stdout
    assert (step / "calc.py").read_text() == "def double(x):\n    return x * 2\n"  # untouched
    # A sample of them (make mutate SAMPLE=2).
    sampled = tool("mutate.py", "--root", str(tmp_path), "01", "calc", "--sample", "2")
    assert "a sample of 2 of its" in sampled.stdout and "(seed 23)" in sampled.stdout
    assert "total jobs: 2" in sampled.stdout
