"""The Kubernetes manifests, checked offline with the tools a platform team uses
(tools/manifests.py): kustomize builds every overlay, kubernetes-validate accepts every
object and refuses a field Kubernetes does not know, checkov's policies pass with every
exception justified; and what the manifests say agrees with what the servers do (their
settings, read by the servers' own parser): ports, probes, grace periods, selectors, the
names Envoy and the Greeters dial, the Secrets' keys. No cluster runs here."""

import base64
import functools
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from settings import LoggerSettings, Settings, parse_settings
from tests.support.readme import console_commands
from tools.envoy import envoy_binary, socket_addresses
from tools.manifests import KUBECTL, build, objects, overlays, policy_failures, validate
from tools.processes import make_certificates

STEP_DIR = Path(__file__).resolve().parent.parent
OVERLAYS = [overlay.name for overlay in overlays(STEP_DIR)]
KUBERNETES_CONFIG = STEP_DIR / "deploy" / "envoy-kubernetes.yaml"
TOKENS = {"GREETER_AUTH_TOKEN": "a" * 32, "LOGGER_AUTH_TOKEN": "b" * 32}
# Each server Deployment, and the settings class its container's variables are read by.
SERVERS = {"greeter-stable": Settings, "greeter-canary": Settings, "logger": LoggerSettings}


@functools.cache
def rendered(overlay: str) -> str:
    return build(STEP_DIR / "overlays" / overlay)


def by_kind(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects(rendered(overlay)) if o["kind"] == kind}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (only,) = pod_spec(deployment)["containers"]
    return only


def port_of(deployment: dict, name: str) -> int:
    return next(p["containerPort"] for p in container(deployment)["ports"] if p["name"] == name)


def selects(selector: dict, deployment: dict) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return selector.items() <= labels.items()


def server_settings(overlay: str, name: str):
    """The settings a server of the manifests starts with: the ConfigMap's variables, its
    container's own values and the Secret's tokens, through the servers' own parser."""
    environ = dict(by_kind(overlay, "ConfigMap")["greeter-settings"]["data"])
    for variable in container(by_kind(overlay, "Deployment")[name]).get("env", []):
        environ[variable["name"]] = variable.get("value", "pod-name")  # valueFrom: a pod's
    return parse_settings([], {**environ, **TOKENS}, SERVERS[name])


def test_there_is_a_dev_and_a_prod_overlay():
    assert OVERLAYS == ["dev", "prod"]


# --- The tools' verdicts --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_is_valid_with_no_unknown_field(overlay):
    kinds = {o["kind"] for o in objects(rendered(overlay))}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"NetworkPolicy", "ConfigMap", "Namespace"} <= kinds
    assert validate(rendered(overlay)) == []


def test_the_validator_refuses_a_misspelt_field():
    """What --strict is for: Kubernetes would drop the unknown field without a word, and the
    pods would run without a liveness probe."""
    broken = rendered("dev").replace("livenessProbe:", "livenesProbe:", 1)
    complaints = validate(broken)
    assert complaints and "'livenesProbe' was unexpected" in complaints[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_security_policies_pass_and_every_exception_says_why(overlay):
    failed, skipped = policy_failures(rendered(overlay))
    assert failed == []
    assert skipped, "the manifests skip a few checks: the test reads their reasons"
    for check in skipped:
        assert len(check["check_result"]["suppress_comment"]) > 30, check["check_id"]


def test_the_policy_check_refuses_a_pod_that_may_run_as_root():
    broken = rendered("dev").replace("runAsNonRoot: true", "runAsNonRoot: false")
    broken = broken.replace("runAsUser: 10001", "runAsUser: 0")
    failed, _ = policy_failures(broken)
    assert any(line.startswith("CKV_K8S_23 Deployment.grpc-mastery.greeter-") for line in failed)


def test_the_overlays_differ_in_what_an_environment_decides():
    """dev: one of each, the image built by hand; prod: the registry's image, room to grow,
    and Envoy behind the cloud's load balancer."""
    dev, prod = by_kind("dev", "Deployment"), by_kind("prod", "Deployment")
    assert {name: d["spec"]["replicas"] for name, d in dev.items()} == {
        "envoy": 1,
        "greeter-canary": 1,
        "greeter-stable": 1,
        "logger": 1,
        "redis": 1,
    }
    assert prod["greeter-stable"]["spec"]["replicas"] == 3
    assert container(prod["greeter-stable"])["image"].startswith("ghcr.io/")
    assert not container(prod["greeter-stable"])["image"].endswith(":latest")
    assert by_kind("prod", "Service")["envoy"]["spec"]["type"] == "LoadBalancer"
    assert by_kind("dev", "Service")["envoy"]["spec"]["type"] == "ClusterIP"


# --- The manifests agree with the servers ---------------------------------------------------


@pytest.mark.parametrize("name", SERVERS)
def test_the_ports_are_the_ones_the_servers_listen_on(name):
    deployment = by_kind("prod", "Deployment")[name]
    settings = server_settings("prod", name)
    assert settings.host == settings.metrics_host == "0.0.0.0"
    assert port_of(deployment, "grpc") == settings.port
    assert port_of(deployment, "metrics") == settings.metrics_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert port_of(deployment, "probes") == settings.health_port


@pytest.mark.parametrize("name", SERVERS)
def test_every_probe_asks_the_plaintext_health_port(name):
    """Kubernetes' gRPC probe has no TLS and no token: the health port is the one it can ask
    (the TLS port would fail every probe, and the pod would never be ready)."""
    spec = container(by_kind("prod", "Deployment")[name])
    settings = server_settings("prod", name)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"] == {"port": settings.health_port}, probe


@pytest.mark.parametrize("name", SERVERS)
def test_a_pod_has_the_time_to_drain_before_it_is_killed(name):
    """preStop's pause, then SIGTERM: NOT_SERVING for the drain delay, then the grace for the
    calls in flight. terminationGracePeriodSeconds counts from the start of preStop."""
    deployment = by_kind("prod", "Deployment")[name]
    spec, settings = container(deployment), server_settings("prod", name)
    pause = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = pause + settings.drain_delay + settings.grace
    assert settings.drain_delay > 0, "a pod that stops serving at once fails calls in flight"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > shutdown
    # The readiness probe notices NOT_SERVING within the drain: no new calls after it.
    readiness = spec["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < settings.drain_delay
    # ... and the liveness probe never restarts a pod that is shutting down.
    liveness = spec["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > shutdown


def test_clients_reconnect_often_enough_to_find_new_pods():
    """The age ends every connection (rebalancing.py); the autoscaler's new pods get calls
    within it. Shorter than the HPA's scale-up checks would be churn for nothing."""
    for name in SERVERS:
        assert 10 <= server_settings("prod", name).max_connection_age <= 120


def test_every_service_budget_and_autoscaler_targets_the_pods_it_means():
    deployments = by_kind("prod", "Deployment")
    for service in by_kind("prod", "Service").values():
        selected = [d for d in deployments.values() if selects(service["spec"]["selector"], d)]
        assert len(selected) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port_of(selected[0], port["targetPort"]), port
    for budget in by_kind("prod", "PodDisruptionBudget").values():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert sum(selects(selector, d) for d in deployments.values()) == 1
    for autoscaler in by_kind("prod", "HorizontalPodAutoscaler").values():
        assert autoscaler["spec"]["scaleTargetRef"]["name"] in deployments


def test_the_services_clients_balance_over_are_headless():
    """A ClusterIP Service balances per connection, and gRPC keeps its connections: every
    call would go to one pod. Headless, the name resolves to every ready pod."""
    services = by_kind("prod", "Service")
    for name in ("greeter-stable", "greeter-canary", "logger"):
        assert services[name]["spec"]["clusterIP"] == "None", name


def test_the_names_the_servers_dial_are_services_of_the_manifests():
    services = by_kind("prod", "Service")
    settings = server_settings("prod", "greeter-stable")
    logger = re.fullmatch(r"dns:///([\w-]+):(\d+)", settings.logger_target)
    assert logger, settings.logger_target
    assert services[logger.group(1)]["spec"]["ports"][0]["port"] == int(logger.group(2))
    redis = urlsplit(settings.rate_limit_redis)
    assert services[redis.hostname]["spec"]["ports"][0]["port"] == redis.port


def test_envoy_in_kubernetes_routes_to_the_releases_services():
    """Envoy's config is compose's (deploy/envoy.yaml), its upstreams named by the releases'
    headless Services, and v2 only on the canary, as in compose."""
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    services = by_kind("prod", "Service")
    for address in socket_addresses(config):
        port = services[address["address"]]["spec"]["ports"][0]["port"]
        assert port == address["port_value"], address
    canary = server_settings("prod", "greeter-canary")
    stable = server_settings("prod", "greeter-stable")
    assert canary.serve_v2 and not stable.serve_v2


def test_envoy_accepts_its_kubernetes_config(tmp_path):
    """`envoy --mode validate` with the files the pod mounts where the config reads them."""
    envoy = by_kind("prod", "Deployment")["envoy"]
    workdir = Path(container(envoy)["workingDir"])
    mounts = {m["name"]: Path(m["mountPath"]) for m in container(envoy)["volumeMounts"]}
    config_map = next(v for v in pod_spec(envoy)["volumes"] if v["name"] == "config")
    deploy = tmp_path / mounts["config"].relative_to(workdir)
    files = {"envoy.yaml": KUBERNETES_CONFIG, "greeter.pb": STEP_DIR / "deploy" / "greeter.pb"}
    files["index.html"] = STEP_DIR / "deploy" / "web" / "index.html"
    for item in config_map["configMap"]["items"]:
        (deploy / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (deploy / item["path"]).write_bytes(files[item["key"]].read_bytes())
    make_certificates(STEP_DIR, tmp_path / mounts["tls"].relative_to(workdir))
    args = container(envoy)["args"]
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_the_readmes_secret_commands_make_the_keys_the_pods_read(tmp_path):
    """The README's `kubectl create secret` lines, run as written (with --dry-run, no
    cluster): their keys are the ones the pods' variables and mounts need."""
    commands = [
        c.line
        for c in console_commands(STEP_DIR / "README.md", "Deploy it to Kubernetes")
        if "create secret" in c.line
    ]
    assert len(commands) == 2
    make_certificates(STEP_DIR, tmp_path / "certs")
    for name in ("greeter", "logger"):  # as the README's set-up writes them
        (tmp_path / f"{name}.token").write_text(f"{name}-token-from-the-file\n")
    secrets = {}
    for line in commands:
        result = subprocess.run(
            ["bash", "-c", f"{line} --dry-run=client -o yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PATH": f"{KUBECTL.parent}:{os.environ['PATH']}"},
        )
        assert result.returncode == 0, result.stderr
        secret = yaml.safe_load(result.stdout)
        secrets[secret["metadata"]["name"]] = set(secret["data"])
        if secret["metadata"]["name"] == "greeter-tokens":  # the token, without the newline
            token = base64.b64decode(secret["data"]["greeter"]).decode()
            assert token == "greeter-token-from-the-file"
    for name in SERVERS:
        for variable in container(by_kind("prod", "Deployment")[name])["env"]:
            if reference := variable.get("valueFrom", {}).get("secretKeyRef"):
                assert reference["key"] in secrets[reference["name"]], variable
    # The servers read certs/server.crt, server.key and ca.crt; so does Envoy's config.
    filenames = re.findall(r"filename: certs/([\w.]+)", KUBERNETES_CONFIG.read_text())
    assert set(filenames) | {"server.crt", "server.key", "ca.crt"} <= secrets["greeter-tls"]


def test_only_envoy_reaches_the_greeters_and_only_greeters_the_logger():
    policies = by_kind("prod", "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"] == {
        "podSelector": {},
        "policyTypes": ["Ingress"],
    }

    def callers(name: str, port: str) -> list[dict]:
        return [
            source
            for rule in policies[name]["spec"]["ingress"]
            if {"port": port} in rule.get("ports", [])
            for source in rule.get("from", [{"anywhere": True}])
        ]

    envoy_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy"}}}
    greeter_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "greeter"}}}
    assert callers("greeter", "grpc") == [envoy_pods]
    assert callers("logger", "grpc") == [greeter_pods]
    assert callers("redis", "redis") == [greeter_pods]
    assert callers("envoy", "edge") == [{"anywhere": True}]
