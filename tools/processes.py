"""Start a step's servers as real processes and find their addresses; run a step's scripts.

Shared by the tour (tools/tour.py) and the steps' tests, so both drive servers the same way
a learner does: `python server.py --port 0`, then read the `listening on HOST:PORT` line.
From step 10 on a step has several services: `StepServices` starts each one the step has,
dependencies first, and points the later ones at the earlier ones' addresses.
"""

import contextlib
import os
import queue
import random
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# `listening on HOST:PORT` says the server is ready; a second port is announced before it in
# the same shape (`metrics on HOST:PORT`).
ADDRESS_LINE = re.compile(r"^(\w+) on (\S+)$")
# Servers started here bind every port they open to a free one: from step 08 on that
# includes /metrics, whose default port would collide between servers running at once.
FREE_PORTS = {"GREETER_METRICS_PORT": "0", "LOGGER_METRICS_PORT": "0"}


def ephemeral_ports() -> range:
    """The ports the kernel hands out by itself: to bind(port 0) and to outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on right now, for a program that cannot be told to
    pick one itself (Prometheus), or one a test starts later on purpose. Taken from below the
    kernel's ephemeral range: a port from inside it could be handed to an outgoing
    connection before the program binds it (seen in CI)."""
    below = range(10000, ephemeral_ports().start)
    for _ in range(200):
        port = random.choice(below) if len(below) > 1000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: another try
            return sock.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


# The signals that ask a tool to stop: Ctrl-C, `kill`, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP stop this tool as Ctrl-C does (KeyboardInterrupt), so every
    `with` block and `finally` unwinds and stops the processes the tool started: without
    this, `kill` ends the tool at once and leaves its children running. Further signals
    are ignored while it cleans up, which is bounded (each process gets 10 s, then
    SIGKILL), so a second Ctrl-C cannot cut the clean-up short."""

    def interrupt(signum, frame):
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        raise KeyboardInterrupt

    for stop in STOP_SIGNALS:
        signal.signal(stop, interrupt)


def until_stopped() -> None:
    """Block until a stop signal ends the tool (KeyboardInterrupt, from stop_on_signals).

    The kernel hands a signal to any thread of the process that does not block it, and
    Python runs its handler in the main thread only once that thread runs Python code
    again: a main thread asleep in a lock, `pause()` or `sigwait()` can miss a signal that
    one of the tool's threads (an output reader) took. The signal's C handler also writes to
    Python's wakeup fd, whichever thread runs it: waiting on that wakes the main thread."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        while True:
            select.select([reader], [], [])
            reader.recv(64)  # the handler runs now, and raises KeyboardInterrupt
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


class ToolError(RuntimeError):
    """What stops a tool, in one line that says what to do: printed without a traceback."""


def require_free_port(port: int, what: str, option: str = "--port") -> None:
    """Fail with a one-line ToolError when something already listens on loopback `port`:
    a program started there would fail, or (Tansu, Envoy) seem to start while its callers
    reach the other one."""
    with socket.socket() as sock:
        # As servers bind: connections of a program just stopped, still in TIME_WAIT, do
        # not make the port taken (a restarted Redis or broker binds it all the same).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ToolError(
                f"port {port} is taken (another {what}?): stop that one, or choose another "
                f"port with {option}"
            ) from None


def run_tool(main_function, argv: list[str] | None = None, stopped: int = 0) -> int:
    """Run a tool's `main(argv)` the way every tool of tools/ stops: SIGINT, SIGTERM and
    SIGHUP stop it and what it started, and it exits with `stopped` (0 for a tool that runs
    until it is stopped, 130 for one whose work was cut short); a ToolError is one line on
    stderr and exit 1."""
    stop_on_signals()
    name = Path(sys.argv[0]).name
    try:
        return main_function(argv)
    except KeyboardInterrupt:
        return stopped
    except ToolError as error:
        print(f"{name}: {error}", file=sys.stderr, flush=True)
        return 1


def stop_process_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the process group `process` leads (started with start_new_session=True):
    the process and everything it started; SIGKILL to whatever is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_alive(process.pid) and time.monotonic() < deadline:
        process.poll()  # reaps the leader once it exits (a zombie still counts)
        time.sleep(0.05)  # polling a condition, not waiting for time to pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is left (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class ServerProcess:
    """A running `python <script> --port 0 ...` in a step folder.

    Use as a context manager; `address` is what the server printed, `addresses` every
    `NAME on HOST:PORT` line up to it ({"metrics": ..., "listening": ...}). Output is
    collected (stdout and stderr interleaved) and available as `output` once stopped.
    """

    def __init__(
        self,
        step_dir: Path,
        *args: str,
        script: str = "server.py",
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
        log_path: Path | None = None,
        python: str = sys.executable,  # another environment's (the image's packages)
    ):
        self.command = [python, script, "--port", "0", *args]
        self._start = (step_dir, args, script, env, ready_timeout, log_path, python)  # restarted()
        # Its output, also written to `log_path` as it comes (tools/up.py).
        self._log = None if log_path is None else open(log_path, "a", encoding="utf-8")
        self.earlier_output = ""  # a restarted server's output before its restart
        self.process = subprocess.Popen(
            self.command,
            cwd=step_dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **FREE_PORTS, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._output: list[str] = []
        self.addresses: dict[str, str] = {}
        # A thread keeps the pipe drained, so a chatty server never blocks on a full pipe.
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = self._wait_until_ready(ready_timeout)
        self.returncode: int | None = None

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._output.append(line)
            self._lines.put(line.rstrip("\n"))
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
        self._lines.put(None)
        if self._log is not None:
            self._log.close()

    def _wait_until_ready(self, timeout: float) -> str:
        try:
            while True:
                line = self._lines.get(timeout=timeout)
                if line is None:
                    break
                if match := ADDRESS_LINE.match(line):
                    self.addresses[match.group(1)] = match.group(2)
                    if match.group(1) == "listening":
                        return match.group(2)
        except queue.Empty:
            self.process.kill()
            raise RuntimeError(f"{' '.join(self.command)}: not ready after {timeout}s") from None
        self.process.wait()
        raise RuntimeError(
            f"{' '.join(self.command)} exited with {self.process.returncode} before serving:\n"
            + self.output
        )

    @property
    def output(self) -> str:
        return self.earlier_output + "".join(self._output)

    def restarted(self) -> "ServerProcess":
        """The same server started again on the port it had, once it has stopped: a
        dependency that comes back at the address its callers know. Start it first with
        `--port` from free_port(): a port the kernel chose (`--port 0`) is in its ephemeral
        range, and may be given to another process's outgoing connection meanwhile."""
        if self.process.poll() is None:
            raise RuntimeError(f"{' '.join(self.command)} is still running")
        step_dir, args, script, env, ready_timeout, log_path, python = self._start
        port = self.address.rsplit(":", 1)[1]  # a later --port wins over the first
        again = ServerProcess(
            step_dir,
            *args,
            "--port",
            port,
            script=script,
            env=env,
            ready_timeout=ready_timeout,
            log_path=log_path,
            python=python,
        )
        again.earlier_output = f"{self.output}(exit code {self.returncode}; started again)\n"
        return again

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` (None: it was sent already), wait for the exit and return the exit code
        (killing it after timeout)."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"{' '.join(self.command)} ignored {sig!r} for {timeout}s") from None
        return self.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class ServiceScript:
    name: str  # "logger"
    script: str  # "logger_server.py"
    # The variable through which the services started after this one find its address.
    address_variable: str | None = None


# Every service a step may have, in the order they start: dependencies first.
SERVICES = (
    ServiceScript("logger", "logger_server.py", address_variable="GREETER_LOGGER_TARGET"),
    ServiceScript("greeter", "server.py"),
)


class StepServices:
    """Every service of a step as real processes, each on a free port, wired together:
    `services["greeter"].address`. `replicas` runs several of a service (step 12 on): the
    second Greeter is `services["greeter-2"]`, and the services started after it get every
    replica's address as one target (`ipv4:HOST:PORT,HOST:PORT`). `args` adds arguments per
    service name, `replica_env` settings per process name (step 17: "greeter-3" is the
    canary), `ports` a port per process name where the kernel's choice will not do (one a
    restart must find free again), `log_dir` a file for each process's output (NAME.log).
    Stops them in reverse order (callers first) and keeps their exit codes in
    `returncodes`."""

    def __init__(
        self,
        step_dir: Path,
        env: dict[str, str] | None = None,
        args: dict[str, tuple[str, ...]] | None = None,
        replicas: dict[str, int] | None = None,
        replica_env: dict[str, dict[str, str]] | None = None,
        log_dir: Path | None = None,
        ports: dict[str, int] | None = None,
    ):
        self.processes: dict[str, ServerProcess] = {}
        self.returncodes: dict[str, int] = {}
        # What each process was given beyond `env`: the addresses, its own settings.
        self.wiring: dict[str, dict[str, str]] = {}
        self.targets: dict[str, str] = {}  # each service's target, all its replicas in it
        wiring: dict[str, str] = {}
        try:
            for service in SERVICES:
                if not (step_dir / service.script).exists():
                    continue
                started = []
                for number in range(1, (replicas or {}).get(service.name, 1) + 1):
                    name = service.name if number == 1 else f"{service.name}-{number}"
                    given = {**wiring, **(replica_env or {}).get(name, {})}
                    port = (ports or {}).get(name)
                    process = ServerProcess(
                        step_dir,
                        *(args or {}).get(service.name, ()),
                        *(("--port", str(port)) if port else ()),  # a later --port wins
                        script=service.script,
                        env={**(env or {}), **given},
                        log_path=None if log_dir is None else log_dir / f"{name}.log",
                    )
                    self.processes[name] = process
                    self.wiring[name] = given
                    started.append(process.address)
                target = started[0] if len(started) == 1 else f"ipv4:{','.join(started)}"
                self.targets[service.name] = target
                if service.address_variable:
                    wiring[service.address_variable] = target
        except BaseException:
            self.stop()
            raise

    def __getitem__(self, name: str) -> ServerProcess:
        return self.processes[name]

    def restart(self, name: str) -> ServerProcess:
        """Start the stopped process `name` again, at its address."""
        self.processes[name] = self.processes[name].restarted()
        return self.processes[name]

    def replicas(self, service: str) -> list[ServerProcess]:
        return [p for n, p in self.processes.items() if n.split("-")[0] == service]

    def stop(self) -> dict[str, int]:
        """SIGTERM to each service's replicas at once (they drain side by side), callers
        first; their exit codes by name."""
        for service in reversed(SERVICES):
            group = {n: p for n, p in self.processes.items() if n.split("-")[0] == service.name}
            for process in group.values():
                if process.process.poll() is None:
                    process.process.send_signal(signal.SIGTERM)
            for name, process in group.items():
                # Not a second SIGTERM: one that arrives after the server has removed its
                # signal handlers, in its last moments, would kill it (exit code -15).
                self.returncodes[name] = process.stop(sig=None)
        return self.returncodes

    def __enter__(self) -> "StepServices":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_script(
    step_dir: Path,
    script: str,
    *args: str,
    input: str | None = None,
    stdin: IO | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python <script> args...` in a step folder and capture its output. Its stdin:
    `input` through a pipe, or the file `stdin` (as `< names.txt` gives it)."""
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=step_dir,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **FREE_PORTS, **(env or {})},
        **({"input": input} if stdin is None else {"stdin": stdin}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_certificates(step_dir: Path, out_dir: Path) -> dict[str, str]:
    """Run the step's ./gen_certs.sh into out_dir, as a learner does (it needs openssl);
    returns the environment that points the server and the client at the files."""
    subprocess.run(
        ["bash", str(step_dir / "gen_certs.sh"), str(out_dir)], check=True, capture_output=True
    )
    return {
        "GREETER_TLS_CERT": str(out_dir / "server.crt"),
        "GREETER_TLS_KEY": str(out_dir / "server.key"),
        "GREETER_TLS_CA": str(out_dir / "ca.crt"),
        # From step 10 on: the Logger's certificate, and the CA the Greeter trusts it by.
        "LOGGER_TLS_CERT": str(out_dir / "server.crt"),
        "LOGGER_TLS_KEY": str(out_dir / "server.key"),
        "GREETER_LOGGER_TLS_CA": str(out_dir / "ca.crt"),
    }


def demo_environment(step_dir: Path, workdir: Path) -> dict[str, str]:
    """The set-up a learner does by hand before running a step, done for the tour and the
    README tests: a fresh auth token (used from step 05 on), one for the Logger (10 on), and,
    for a step with gen_certs.sh (06 on), certificates in workdir."""
    env = {"GREETER_AUTH_TOKEN": secrets.token_urlsafe(32)}
    if (step_dir / "logger_server.py").exists():
        env["LOGGER_AUTH_TOKEN"] = secrets.token_urlsafe(32)
    if (step_dir / "gen_certs.sh").exists():
        env |= make_certificates(step_dir, workdir / "certs")
    return env
