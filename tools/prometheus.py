"""A real Prometheus for the tour and the tests: the `prometheus` binary with a step's
deploy/ configuration, scraping servers the caller started, with its own port and storage.

    with PrometheusProcess(step_dir / "deploy", {"greeter:9464": metrics_address}) as prom:
        prom.query('sum(grpc_server_handled_total)')

    cd step-08_prometheus && python ../tools/prometheus.py greeter:9464=127.0.0.1:9464
        # one for a learner, on http://127.0.0.1:9090, until Ctrl-C

Prometheus answers a query about its first scrape ~5.5 s after it starts (a fixed reload
throttle, whatever the scrape interval): callers poll `query` until the answer is there.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.processes import ToolError, free_port, require_free_port, run_tool

INSTALL_HINT = "sudo apt-get install prometheus (Debian/Ubuntu), brew install prometheus (macOS)"


class PrometheusProcess:
    """`prometheus` running with the files of `deploy_dir` (prometheus.yml and the rule files
    beside it), each `targets` key replaced by its value, scraping and evaluating its rules
    every second."""

    def __init__(
        self, deploy_dir: Path, targets: dict[str, str], ready_timeout: float = 30.0, port: int = 0
    ):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(f"needs `prometheus`: {INSTALL_HINT}")
        self.directory = Path(tempfile.mkdtemp(prefix="prometheus-"))
        for path in deploy_dir.glob("*.yml"):
            shutil.copy(path, self.directory / path.name)
        self.targets = list(targets.values())
        config = (self.directory / "prometheus.yml").read_text()
        for placeholder, address in targets.items():
            config = config.replace(placeholder, address)
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
        config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        (self.directory / "prometheus.yml").write_text(config)
        self.url = f"http://127.0.0.1:{port or free_port()}"
        self._log = (self.directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
                # Keep the exemplars (trace ids) metrics.py attaches to its histograms.
                "--enable-feature=exemplar-storage",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_until_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.log}")
            time.sleep(0.05)  # polling a condition, not waiting for time to pass

    @property
    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text()

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """The result of an instant query, now or `at` a Unix time:
        [{"metric": {labels}, "value": [time, "text"]}]."""
        parameters = {"query": promql} | ({} if at is None else {"time": at})
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(parameters)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        if answer["status"] != "success":
            raise RuntimeError(f"{promql}: {answer}")
        return answer["data"]["result"]

    def exemplars(self, promql: str, since: float) -> list[dict]:
        """The exemplars of the series `promql` selects, from `since` (a Unix time) to now:
        [{"seriesLabels": {...}, "exemplars": [{"labels": {"trace_id": ...}, ...}]}]."""
        parameters = {"query": promql, "start": since, "end": time.time()}
        url = f"{self.url}/api/v1/query_exemplars?{urllib.parse.urlencode(parameters)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"]

    def rules(self) -> list[dict]:
        """Every rule Prometheus loaded from the rule files: [{"name", "health", ...}]."""
        with urllib.request.urlopen(f"{self.url}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def scraped_after(self, moment: float, targets: list[str] | None = None) -> bool:
        """Whether each of `targets` (default: every one the caller gave) has been scraped,
        successfully, since `moment` (a Unix time): what happened before it is in Prometheus."""
        # timestamp() of a plain selector is the time of the sample (after `== 1` it would be
        # the time of the query): the last scrape of each target.
        up = {r["metric"]["instance"] for r in self.query("up") if r["value"][1] == "1"}
        last = {r["metric"]["instance"]: float(r["value"][1]) for r in self.query("timestamp(up)")}
        return all(t in up and last[t] > moment for t in targets or self.targets)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "PrometheusProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Prometheus with deploy/ of the step folder you are in, on loopback."
    )
    parser.add_argument(
        "targets", nargs="+", metavar="NAME:PORT=HOST:PORT", help="prometheus.yml's target=address"
    )
    parser.add_argument("--port", type=int, default=9090)
    args = parser.parse_args(argv)
    deploy_dir = Path.cwd() / "deploy"
    if not (deploy_dir / "prometheus.yml").exists():
        raise ToolError("no deploy/prometheus.yml here: run it from a step folder (08 on)")
    require_free_port(args.port, "prometheus")
    targets = dict(pair.split("=", 1) for pair in args.targets)
    try:
        prometheus = PrometheusProcess(deploy_dir, targets, port=args.port)
    except RuntimeError as error:
        raise ToolError(str(error)) from None
    with prometheus:
        print(f"prometheus on {prometheus.url}; Ctrl-C stops it", flush=True)
        prometheus.process.wait()
    raise ToolError(f"prometheus exited on its own with {prometheus.process.returncode}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
