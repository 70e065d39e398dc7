"""A real Redis for the tour and the tests: Debian's `redis-server`, on a free loopback port,
where the replicas of step 18 share their rate limits.

    with RedisServer() as redis:
        redis.url               # "redis://127.0.0.1:PORT/0", for GREETER_RATE_LIMIT_REDIS
        redis.stop(); redis.start()   # down, then back on the same port (empty: buckets
                                      # refill, which is what a rate limit may lose)

    python tools/redis.py [--port 6379]     # one for a learner, until Ctrl-C

It keeps nothing on disk (`--save ""`, no append-only file): buckets are seconds of state.
"""

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.broker import stop_process, wait_for_port
from tools.processes import ToolError, free_port, require_free_port, run_tool, until_stopped

INSTALL_HINT = "sudo apt-get install redis-server (Debian/Ubuntu), brew install redis (macOS)"


class RedisServer:
    """`redis-server` on `port` (a free one by default), in memory only."""

    def __init__(self, port: int = 0):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError(f"needs `redis-server`: {INSTALL_HINT}")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("redis is running")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, self.process, "redis-server")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="A Redis on loopback, in memory only.")
    parser.add_argument("--port", type=int, default=6379)
    port = parser.parse_args(argv).port
    require_free_port(port, "redis")
    try:
        with RedisServer(port) as redis:
            print(f"redis on {redis.url}; Ctrl-C ends it", flush=True)
            until_stopped()
    except RuntimeError as error:  # a binary missing, or a process that would not start
        raise ToolError(str(error)) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
