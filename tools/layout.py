"""The Layout section of every step README: each file of the step on one line, what it is
for, and the step that brought it, so a learner in step 17 finds any feature's file at a
glance. The file names are the same in every step, so each is described once, here;
`python tools/ladder.py layout` writes the sections and tests/test_docs.py checks them.
"""

import re
from pathlib import Path

from tools.steps import Step

# What each file is for, by its path in a step folder. A step that adds a file adds a line.
PURPOSE = {
    "README.md": "this page",
    "server.py": "the Greeter's wiring and its entry point, `python server.py`",
    "client.py": "the demo client: `python client.py hello --name Ada`, and more",
    "service.py": "the Greeter servicer: each RPC, and the input it accepts",
    "settings.py": "every option of servers and client, declared once (flag, variable, default)",
    "venv_check.py": "the first import of each entry point: outside the virtual env, one line",
    "drain.py": "refusing a client stream once the client stops sending (grpc/grpc#36066)",
    "protos/greeter/v1/greeter.proto": "the API: `greeter.v1.Greeter`",
    "interceptors.py": "generic helpers for interceptors of any RPC kind",
    "rpc_log.py": "one log line per RPC, on the server and on the client",
    "auth.py": "token and user id in metadata, checked by an interceptor",
    "caller.py": "who is calling the RPC being served",
    "tls.py": "TLS for server and client, mutual TLS on request",
    "gen_certs.sh": "makes a test CA and the certificates in `certs/`",
    "health.py": "the standard health service, and what a draining server says",
    "keepalive.py": "keepalive pings: what the servers accept and send",
    "metrics.py": "Prometheus metrics of every RPC, as go-grpc-prometheus names them",
    "deploy/prometheus.yml": "Prometheus scraping the services",
    "deploy/alerts.yml": "the alert rules",
    "deploy/alerts_test.yml": "the alert rules' unit tests (`promtool test rules`)",
    "tracing.py": "OpenTelemetry: a span per RPC, its context carried across calls",
    "serving.py": "how a server runs, the Greeter and the Logger alike",
    "logger_server.py": "the Logger's entry point, `python logger_server.py`",
    "logger_service.py": "the Logger servicer: it stores and lists greetings",
    "logger_client.py": "the Greeter's side of the Logger: one channel, reports that never fail it",
    "protos/logger/v1/logger.proto": "the Logger's API: `logger.v1.Logger`",
    "propagation.py": "what a call carries on: user, request id, what is left of the deadline",
    "balancing.py": "client-side round robin over replicas, with health checking",
    "retries.py": "the retry policy and the report's attempts within the deadline",
    "breaker.py": "the circuit breaker around the Greeter's calls to the Logger",
    "dashboard.py": "the Grafana dashboard as code",
    "deploy/grafana/dashboards/greeter.json": "the dashboard `dashboard.py` builds (checked in)",
    "deploy/grafana/provisioning/dashboards/dashboards.yml": "Grafana: where the dashboards are",
    "deploy/grafana/provisioning/datasources/datasources.yml": "Grafana: Prometheus as a data source",
    "outbox.py": "the Greeter's events: a bounded outbox, delivered to Kafka",
    "greeting_counts.py": "the Logger's consumer of the events: counts greetings per user",
    "protos/events/v1/events.proto": "the event: `events.v1.GreetedEvent`",
    "service_v2.py": "`greeter.v2.GreeterService`, served through the v1 Greeter",
    "protos/greeter/v2/greeter.proto": "the API's version 2: `greeter.v2.GreeterService`",
    "buf.yaml": "buf's lint and breaking-change rules for `protos/`",
    "deploy/envoy.yaml": "Envoy in front of the Greeters: routes, health checks, retries, limits",
    "ratelimit.py": "rate limits per caller: token buckets, shared through Redis, and the refusal",
    "deploy/web/index.html": "a page that greets through the REST API (Envoy serves it)",
    "third_party/google/api/annotations.proto": "`google.api.http`, for buf (as googleapis ships it)",
    "third_party/google/api/http.proto": "the HTTP mapping's rules, for buf (as googleapis ships it)",
    "rebalancing.py": "connections that end, so that clients find the replicas a scale-up adds",
    "deploy/kustomization.yaml": "Kubernetes: the base of the overlays, Envoy's config as a ConfigMap",
    "deploy/k8s/namespace.yaml": "Kubernetes: the namespace, with the restricted pod security",
    "deploy/k8s/settings.yaml": "Kubernetes: the servers' settings (a ConfigMap)",
    "deploy/k8s/greeter/greeter.yaml": "Kubernetes: a Greeter release (pods, Service, budget, autoscaler)",
    "deploy/k8s/greeter/kustomization.yaml": "Kubernetes: the release template, for the two below",
    "deploy/k8s/greeter-stable/kustomization.yaml": "Kubernetes: the previous release (v1 only)",
    "deploy/k8s/greeter-canary/kustomization.yaml": "Kubernetes: the new release, the canary",
    "deploy/k8s/logger.yaml": "Kubernetes: the Logger (pods, headless Service, budget)",
    "deploy/k8s/envoy.yaml": "Kubernetes: Envoy at the edge (pods, Service, budget)",
    "deploy/k8s/redis.yaml": "Kubernetes: Redis for the shared rate limits",
    "deploy/k8s/network-policies.yaml": "Kubernetes: who may connect to whom",
    "overlays/dev/kustomization.yaml": "Kubernetes: a cluster of your own (`kubectl apply -k`)",
    "overlays/prod/kustomization.yaml": "Kubernetes: production: the registry's image, more replicas",
    "validation.py": "request validation: the protos' rules checked by one interceptor",
    "protos/names/v1/names.proto": "the rules of a name, declared once (protovalidate predefined rules)",
    "third_party/buf/validate/validate.proto": "`buf.validate`, the rules' definitions (protovalidate v1.2.0)",
    "tests/conftest.py": "the tests' fixtures: servers, channels, stand-in services",
    "tests/helpers.py": "what the tests call besides fixtures",
}
TEST_FILES = re.compile(r"^tests/test_[a-z0-9_]+\.py$")
SECTION = re.compile(r"^## Layout\n.*?(?=^## )", re.MULTILINE | re.DOTALL)


def first_steps(steps: list[Step], files_of) -> dict[str, str]:
    """{path: label of the first step that has it}."""
    since: dict[str, str] = {}
    for step in steps:
        for name in files_of(step.path):
            since.setdefault(name, step.label)
    return since


def render(step: Step, steps: list[Step], files_of) -> str:
    """The Layout section of `step`'s README (heading included)."""
    files = sorted(files_of(step.path))
    since = first_steps([s for s in steps if s.number <= step.number], files_of)
    undescribed = [f for f in files if f not in PURPOSE and not TEST_FILES.match(f)]
    if undescribed:
        raise KeyError(f"no PURPOSE in tools/layout.py for {undescribed}")
    rows = [
        f"| `{name}` | {PURPOSE[name]} | {since[name]} |"
        for name in sorted((f for f in files if not TEST_FILES.match(f)), key=order)
    ]
    tests = ", ".join(
        f"`{Path(f).name}` ({since[f]})"
        for f in sorted(files, key=lambda f: since[f])
        if TEST_FILES.match(f)
    )
    rows.append(f"| `tests/test_*.py` | one file per feature: {tests} | |")
    return (
        "## Layout\n\n"
        "Every file of this step, what it is for, and the step that brought it (generated by\n"
        "`python tools/ladder.py layout`; generated gRPC code left out):\n\n"
        "| file | what it is for | since |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
    )


def order(name: str) -> tuple:
    """Entry points and the service first, then the other files of the folder, then those
    in its subfolders (deploy/, protos/), then tests/."""
    first = ["README.md", "server.py", "logger_server.py", "client.py", "service.py"]
    if name in first:
        return (0, first.index(name), name)
    return (1, "/" in name, name.startswith("tests/"), name)


def with_layout(readme: str, section: str) -> str:
    """`readme` with its Layout section replaced, or added before "## Run it"."""
    if SECTION.search(readme):
        return SECTION.sub(lambda _: section, readme, count=1)
    return readme.replace("## Run it\n", section + "## Run it\n", 1)
