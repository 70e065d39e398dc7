"""A step's whole stack on loopback, as its README runs it, until Ctrl-C: no Docker.

    python tools/up.py NN      (make up STEP=NN)

The step's services (its replicas from step 12 on, as the tour runs them), each on a free
port with the step's default settings; from step 08 a real Prometheus scraping them with the
step's alert rules, its web UI on a printed port; from step 09 a trace receiver that prints
each finished trace here as a tree; from step 16 the broker (Enter stops it and starts it
again, as in the step's README); from step 17 Envoy in front of the Greeters. It prints
every address, where the tokens and each process's log are, and commands to try from
another terminal. Ctrl-C (or SIGTERM, SIGHUP) stops everything it started; the logs stay.
"""

import argparse
import contextlib
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.broker import KafkaBroker, S3Server, serve
from tools.envoy import RELEASES, EnvoyProcess
from tools.otlp_receiver import OtlpReceiver, print_traces
from tools.processes import StepServices, ToolError, demo_environment, run_tool, until_stopped
from tools.prometheus import INSTALL_HINT, PrometheusProcess
from tools.redis import RedisServer
from tools.steps import Step, find_step
from tools.tour import METRICS_PORTS, TOUR

# Spans leave each process every 0.1 s (the SDK's default is 5 s), so a trace is printed
# about a second after its last span.
SPAN_BATCH_MS = "100"
TRACE_QUIET_SECONDS = 1.0


def try_commands(
    step: Step, env: dict[str, str], token_file: Path, target: str, metrics: str | None
) -> list[str]:
    """What a learner types in another terminal to call the stack."""
    exported = {"GREETER_AUTH_TOKEN": f"$(cat {shlex.quote(str(token_file))})"}
    for name in ("GREETER_TLS_CA", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if name in env:
            exported[name] = shlex.quote(env[name])
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        exported["OTEL_BSP_SCHEDULE_DELAY"] = SPAN_BATCH_MS
    exported["GREETER_TARGET"] = target
    lines = [
        f"cd {step.path.name}",
        "export " + " ".join(f"{name}={value}" for name, value in exported.items()),
        "python client.py hello --name Ada --user-id ada",
        "python client.py stream --name Ada --count 3 --user-id ada",
    ]
    if metrics:
        lines.append(f"curl -s http://{metrics}/metrics | grep ^greeter_")
    if (step.path / "deploy" / "greeter.pb").exists():  # REST through Envoy (step 19 on)
        lines.append(
            'curl -s -w \'\\n\' --cacert "$GREETER_TLS_CA" -H "authorization: Bearer '
            '$GREETER_AUTH_TOKEN" -H \'x-user-id: ada\' --json \'{"name": "Ada"}\' '
            f"https://{target}/v1/greetings"
        )
        lines.append(f"# and the page: https://{target}/ (README, 'From a browser')")
    return lines


def bring_up(
    step: Step, workdir: Path, stack: contextlib.ExitStack
) -> tuple[list[str], KafkaBroker | None]:
    """Start everything of `step` (stopped by `stack`); the summary to print, and the
    broker when the step has one."""
    entry = TOUR[step.number]
    env = demo_environment(step.path, workdir)  # tokens, certificates
    shown = ["tokens and certificates:"]
    for name in ("GREETER_AUTH_TOKEN", "LOGGER_AUTH_TOKEN"):
        if name in env:
            token_file = workdir / f"{name.split('_')[0].lower()}.token"
            token_file.write_text(env[name] + "\n")
            shown.append(f"  {name}: {token_file}")
    if (workdir / "certs").exists():
        shown.append(f"  certificates: {workdir / 'certs'}")
    shown.append("running:")
    broker = None
    if (step.path / "tracing.py").exists():
        receiver = stack.enter_context(OtlpReceiver())
        stopped = threading.Event()
        stack.callback(stopped.set)
        threading.Thread(
            target=print_traces, args=(receiver, stopped, TRACE_QUIET_SECONDS), daemon=True
        ).start()
        env |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": SPAN_BATCH_MS,
        }
        shown.append(f"  traces      {receiver.endpoint} (OTLP): each trace is printed here")
    if entry.broker:
        broker = stack.enter_context(KafkaBroker(stack.enter_context(S3Server())))
        env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
        shown.append(
            f"  broker      {broker.bootstrap} (Tansu, its log in S3): Enter stops it and "
            "starts it again"
        )
    if entry.redis:
        redis = stack.enter_context(RedisServer())
        env["GREETER_RATE_LIMIT_REDIS"] = redis.url
        shown.append(f"  redis       {redis.url}: the Greeters share their rate limits there")
    logs = workdir / "logs"
    logs.mkdir()
    services = stack.enter_context(
        StepServices(
            step.path,
            env,
            replicas=dict(entry.replicas),
            replica_env=RELEASES if entry.envoy else None,
            log_dir=logs,
        )
    )
    for name, process in services.processes.items():
        metrics = process.addresses.get("metrics")
        shown.append(
            f"  {name:<11} {process.address}"
            + (f", metrics on {metrics}" if metrics else "")
            + f", log {logs / (name + '.log')}"
        )
    if (step.path / "deploy" / "prometheus.yml").exists() and shutil.which("prometheus") is None:
        shown.append(f"  prometheus  not started: it needs `prometheus` ({INSTALL_HINT})")
    elif (step.path / "deploy" / "prometheus.yml").exists():
        targets = {
            f"{name}:{METRICS_PORTS[name.split('-')[0]]}": process.addresses["metrics"]
            for name, process in services.processes.items()
        }
        prometheus = stack.enter_context(PrometheusProcess(step.path / "deploy", targets))
        shown.append(f"  prometheus  {prometheus.url} (its web UI; the step's alert rules)")
    target = services.targets["greeter"]
    if entry.envoy:
        upstreams = {name: services[name].address for name in RELEASES}
        envoy = stack.enter_context(EnvoyProcess(step.path, workdir / "certs", upstreams))
        target = envoy.address
        shown.append(f"  envoy       {envoy.address}, admin on {envoy.admin_url}")
    greeter_metrics = services["greeter"].addresses.get("metrics")
    shown.append("try, in another terminal, from the repository's root:")
    token_file = workdir / "greeter.token"
    shown += [f"  {line}" for line in try_commands(step, env, token_file, target, greeter_metrics)]
    return shown, broker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A step's whole stack, until Ctrl-C.")
    parser.add_argument("step", metavar="NN")
    args = parser.parse_args(argv)
    try:
        step = find_step(args.step)
    except SystemExit as missing:
        raise ToolError(str(missing)) from None
    if step.number not in TOUR:
        raise ToolError(f"step {step.label} has no entry in tools/tour.py yet")
    workdir = Path(tempfile.mkdtemp(prefix=f"up-{step.label}-"))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.callback(print, f"stopped everything; the logs stay in {workdir}/logs", flush=True)
        try:
            summary, broker = bring_up(step, workdir, stack)
        except RuntimeError as error:  # a process that would not start says why
            raise ToolError(f"{error} (logs in {workdir})") from None
        print(f"step {step.label} is up after {time.monotonic() - started:.1f} s", flush=True)
        print("\n".join(summary), flush=True)
        print("Ctrl-C stops everything", flush=True)
        if broker:
            serve(broker)  # Enter stops and starts it, until a stop signal
        else:
            until_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
