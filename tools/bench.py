"""What each step's features cost per call: every step's servers, with what the step needs
beside them, under the same unary load, side by side with step 01 and a bare grpc.aio server.
From step 18 on a step runs twice: its rate limits in each process ("18"), and shared
through Redis ("18+redis"), as compose runs it. From step 19 on, once more with SayHello
as REST and JSON through Envoy's transcoder ("19 rest": POST /v1/greetings), beside the
same call in gRPC through the same Envoy ("19").

    python tools/bench.py [NN ...] [--rounds 3] [--seconds 3] [--out bench]   (make bench)
    python tools/bench.py NN ... --against REV    (each step also as it is at git REV)
    python tools/bench.py NN ... --unary-only --rounds 8    (SayHello @16 only, more rounds)
    python tools/bench.py leaks [NN ...] [--out bench]    (make bench: 03, 07 and 17)
    python tools/bench.py serve NN    (one step as the bench runs it, until Ctrl-C: to profile)

For each variant (the bare server, then each step) and each round, the variant's processes
are started as the step's README starts them (the Logger from step 10, Envoy and three
Greeters in step 17), with a trace receiver (sampling 10%) from step 09 and a broker from
step 16. Then, for 16 and then 64 concurrent calls, a load generator in a process of its own
(`python tools/bench.py load ...`) calls SayHello without a pause: a warm-up, then a measured
window. Measured: calls per second and p50/p99 latency (the load generator), and the CPU
time of every process of the variant during the window, per call (/proc). Variants are
alternated within each round (every other round in reverse order), so a slow minute of the
machine spreads over all of them and none always runs first; the table shows each figure's median over the rounds, with the spread.

Writes OUT/results.md (the table, the machine and the date), OUT/results.json (the medians)
and OUT/cost.png (a chart of them, tools/bench_chart.py). `leaks` writes OUT/leaks.md:
each step's memory before and after 20,000 unary calls and 20,000 short chats.
"""

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.bench_chart import draw as draw_chart
from tools.broker import KafkaBroker
from tools.envoy import RELEASES, EnvoyProcess
from tools.otlp_receiver import OtlpReceiver
from tools.processes import ServerProcess, StepServices, demo_environment, run_tool, until_stopped
from tools.redis import RedisServer
from tools.steps import ROOT, Step, find_step, select_steps

CONCURRENCY = (16, 64)
STREAMING_CONCURRENCY = 16
METHODS = {
    "unary": "/greeter.v1.Greeter/SayHello",
    "stream": "/greeter.v1.Greeter/StreamGreetings",
    "many": "/greeter.v1.Greeter/GreetMany",
    "chat": "/greeter.v1.Greeter/Chat",
}
# HelloRequest(name="Ada") and HelloRequest(name="Ada", count=10), encoded by hand: the load
# generator needs no step's code.
REQUEST = b"\x0a\x03Ada"
STREAM_REQUEST = REQUEST + b"\x10\x0a"
# SayHello over REST (step 19 on): the same request, as JSON, to the path Envoy maps to it.
REST_PATH = "/v1/greetings"
REST_BODY = b'{"name": "Ada"}'
CHAT_MESSAGES = 100  # a chat holds at most 100 messages: then the caller starts another
MANY_NAMES = 10  # names in each GreetMany call
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- The load generator: a process of its own ---------------------------------------------


class RestError(Exception):
    """A REST call answered with another status than 200."""


async def generate_load(args: argparse.Namespace) -> dict:
    import ssl

    import aiohttp
    import grpc

    if args.ca:
        credentials = grpc.ssl_channel_credentials(args.ca)
        channel = grpc.aio.secure_channel(args.target, credentials)
    else:
        channel = grpc.aio.insecure_channel(args.target)
    # REST: HTTP/1.1 with keep-alive, a connection per caller, as a REST client has.
    tls = ssl.create_default_context(cadata=args.ca.decode()) if args.ca else None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls or False, limit=args.concurrency)
    )
    rest_url = f"{'https' if args.ca else 'http'}://{args.target}{REST_PATH}"
    metadata = (
        (("authorization", f"Bearer {args.token}"), ("x-user-id", "bench")) if args.token else ()
    )
    latencies: list[float] = []  # unary and many: per call; stream and chat: per message
    errors = 0
    unimplemented = 0  # the server has no such RPC (a step at an older revision, --against)
    started = time.monotonic()
    window = (started + args.warmup, started + args.warmup + args.seconds)
    remaining = args.calls  # --calls N: N calls (or chats), however long they take
    if remaining:
        window = (started, float("inf"))

    async def clock() -> None:
        """Tell the parent when the window opens and closes: it reads the CPU clocks then."""
        for moment, word in zip(window, ("measuring", "done"), strict=True):
            await asyncio.sleep(moment - time.monotonic())
            print(word, flush=True)

    def measured(began: float) -> None:
        """One call or message done; counted when it began and ended in the window."""
        done = time.monotonic()
        if began >= window[0] and done <= window[1]:
            latencies.append(done - began)

    async def unary(began: float) -> None:
        await channel.unary_unary(METHODS["unary"])(REQUEST, metadata=metadata, timeout=10)
        measured(began)

    async def rest(began: float) -> None:
        headers = {"content-type": "application/json", **dict(metadata)}
        timeout = aiohttp.ClientTimeout(total=10)
        async with session.post(rest_url, data=REST_BODY, headers=headers, timeout=timeout) as r:
            await r.read()
            if r.status != 200:
                raise RestError(r.status)
        measured(began)

    async def stream(began: float) -> None:
        call = channel.unary_stream(METHODS["stream"])(
            STREAM_REQUEST, metadata=metadata, timeout=10
        )
        last = began
        async for _ in call:
            measured(last)
            last = time.monotonic()

    async def many(began: float) -> None:
        names = iter([REQUEST] * MANY_NAMES)
        await channel.stream_unary(METHODS["many"])(names, metadata=metadata, timeout=10)
        measured(began)

    async def chat(began: float) -> None:
        call = channel.stream_stream(METHODS["chat"])(metadata=metadata, timeout=60)
        for _ in range(args.messages):
            sent = time.monotonic()
            if sent >= window[1]:
                break
            await call.write(REQUEST)
            await call.read()
            measured(sent)
        await call.done_writing()
        if await call.code() != grpc.StatusCode.OK:
            raise grpc.aio.AioRpcError(await call.code(), None, None, await call.details())

    one = {"unary": unary, "rest": rest, "stream": stream, "many": many, "chat": chat}[args.kind]

    def another() -> bool:
        nonlocal remaining
        if args.calls:
            remaining -= 1
            return remaining >= 0
        return time.monotonic() < window[1]

    async def caller() -> None:
        nonlocal errors, unimplemented
        while another():
            try:
                await one(time.monotonic())
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    unimplemented += 1
                else:
                    errors += 1
            except (RestError, aiohttp.ClientError, TimeoutError):
                errors += 1

    async with channel, session:
        clocked = () if args.calls else (clock(),)
        await asyncio.gather(*clocked, *(caller() for _ in range(args.concurrency)))
    latencies.sort()
    return {
        "calls": len(latencies),  # unary, many: calls; stream: messages; chat: round trips
        "errors": errors,
        "unimplemented": unimplemented,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


# --- A bare grpc.aio server: the floor every step is compared with -----------------------


async def serve_bare() -> None:
    """Step 01's Greeter.SayHello with nothing around it: grpc.aio, its generated code, no
    validation, no interceptor."""
    import grpc

    sys.path.insert(0, str(find_step("01").path))
    from greeter.v1 import greeter_pb2, greeter_pb2_grpc

    class Bare(greeter_pb2_grpc.GreeterServicer):
        async def SayHello(self, request, context):
            return greeter_pb2.HelloReply(message=f"Hello, {request.name}!")

    server = grpc.aio.server()
    greeter_pb2_grpc.add_GreeterServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# --- Measuring -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Running:
    """A variant's processes while it runs: where the load goes, how to reach it, whose
    CPU counts."""

    target: str
    pids: list[int]
    ca: str | None = None
    token: str | None = None
    names: list[str] = field(default_factory=list)  # of the processes, as `pids` lists them


@contextlib.contextmanager
def bare_server():
    with ServerProcess(ROOT, script="tools/bench.py", ready_timeout=20) as process:
        yield Running(process.address, [process.process.pid], names=["bare"])


# From step 18 on every caller has a rate limit. The load generator is one user calling as
# fast as it can: limits it never reaches, so every call pays for its token and none is
# refused (a refusal costs less than a greeting, and would flatter the figures).
UNREACHED_LIMITS = {
    f"{service}_{name}": "1000000"
    for service in ("GREETER", "LOGGER")
    for name in ("RATE_LIMIT", "RATE_BURST")
}
UNREACHED_EDGE_BUCKET = {
    "max_tokens": 1_000_000,
    "tokens_per_fill": 1_000_000,
    "fill_interval": "1s",
}


@contextlib.contextmanager
def step_servers(step: Step, workdir: Path, shared_limits: bool = False):
    """The step's processes as its README runs them, and what they need beside them; with
    `shared_limits` (step 18 on), the rate limits in Redis rather than in each process."""
    env = demo_environment(step.path, workdir)
    # Everything else as a learner runs it (the log at INFO: from step 04 on, a line per
    # call), but streams without a pause between replies: the bench measures the server,
    # not the half second StreamGreetings waits by default.
    env["GREETER_STREAM_INTERVAL"] = "0"
    replicas, replica_env = {}, {}
    with contextlib.ExitStack() as stack:
        if step.number >= 9:
            receiver = stack.enter_context(OtlpReceiver())
            env |= {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            }
        if step.number >= 16:
            broker = stack.enter_context(KafkaBroker())
            env |= {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "LOGGER_EVENTS_ASSIGNMENT": "all"}
        limited = (step.path / "ratelimit.py").exists()
        if limited:
            env |= UNREACHED_LIMITS
        redis = stack.enter_context(RedisServer()) if shared_limits else None
        if redis is not None:
            env["GREETER_RATE_LIMIT_REDIS"] = redis.url
        if (step.path / "deploy" / "envoy.yaml").exists():
            replicas = {"greeter": 3}
            replica_env = RELEASES
        services = stack.enter_context(
            StepServices(step.path, env, replicas=replicas, replica_env=replica_env)
        )
        pids = [p.process.pid for p in services.processes.values()]
        names = list(services.processes)
        if redis is not None and redis.process is not None:  # its CPU is the limits' too
            pids, names = [*pids, redis.process.pid], [*names, "redis"]
        target = services["greeter"].address
        if replicas:
            upstreams = {name: services[name].address for name in RELEASES}
            bucket = UNREACHED_EDGE_BUCKET if limited else None
            envoy = stack.enter_context(
                EnvoyProcess(step.path, workdir / "certs", upstreams, user_bucket=bucket)
            )
            target, pids, names = envoy.address, [*pids, envoy.process.pid], [*names, "envoy"]
        yield Running(
            target,
            pids,
            names=names,
            ca=env.get("GREETER_TLS_CA"),
            token=env["GREETER_AUTH_TOKEN"] if step.number >= 5 else None,
        )


def measure(running: Running, kind: str, concurrency: int, seconds: float, warmup: float) -> dict:
    """One run of the load generator against `running`: its figures, and the variant's CPU
    time per call (or per message) during the measured window."""
    command = [sys.executable, str(Path(__file__).resolve()), "load", "--kind", kind]
    command += ["--target", running.target, "--concurrency", str(concurrency)]
    command += ["--seconds", str(seconds), "--warmup", str(warmup)]
    if running.ca:
        command += ["--ca", running.ca]
    env = {**os.environ, "BENCH_TOKEN": running.token or "", "GRPC_VERBOSITY": "NONE"}
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert load.stdout is not None
    clocks, result = [], None
    for line in load.stdout:
        if line.strip() in ("measuring", "done"):
            clocks.append(sum(cpu_seconds(pid) for pid in running.pids))
        elif line.startswith("{"):
            result = json.loads(line)
    if load.wait() != 0 or len(clocks) != 2 or result is None:
        raise RuntimeError(f"the load generator failed: {' '.join(command)}")
    calls = result["calls"]
    result["per_second"] = calls / seconds
    result["cpu_us_per_call"] = 1e6 * (clocks[1] - clocks[0]) / calls if calls else None
    return result


@dataclass
class Sample:
    """One variant's figures in one round."""

    calls_per_second: dict[int, float] = field(default_factory=dict)  # by concurrency
    p50_ms: float = 0.0  # at 16 concurrent calls
    p99_ms: float = 0.0
    cpu_us_per_call: float = 0.0
    stream_messages_per_second: float | None = None  # None: the variant has no such RPC
    many_calls_per_second: float | None = None  # GreetMany calls of MANY_NAMES names
    chat_round_trips_per_second: float | None = None
    failed: int = 0
    peak_rss_mb: float = 0.0


def run_variant(
    start,
    first_step: int,
    seconds: float,
    warmup: float,
    unary_only: bool = False,
    rest: bool = False,
) -> Sample:
    """Start a variant, measure it, stop it. `first_step`: the step it is (0: the bare
    server), which says whether it has StreamGreetings (step 02 on), GreetMany and Chat (03 on).
    `unary_only`: SayHello from 16 callers, nothing else (a quicker round, so more rounds).
    `rest`: SayHello as REST and JSON (step 19 on), nothing else."""
    sample = Sample()
    kind, streams = ("rest", False) if rest else ("unary", not unary_only)
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir, start(Path(workdir)) as running:
        for concurrency in CONCURRENCY[:1] if unary_only else CONCURRENCY:
            result = measure(running, kind, concurrency, seconds, warmup)
            sample.calls_per_second[concurrency] = result["per_second"]
            sample.failed += result["errors"]
            if concurrency == 16:
                sample.p50_ms, sample.p99_ms = result["p50_ms"], result["p99_ms"]
                sample.cpu_us_per_call = result["cpu_us_per_call"]
        if first_step >= 2 and streams:
            result = measure(running, "stream", STREAMING_CONCURRENCY, seconds, warmup)
            sample.stream_messages_per_second = result["per_second"]
            sample.failed += result["errors"]
        if first_step >= 3 and streams:
            result = measure(running, "many", STREAMING_CONCURRENCY, seconds, warmup)
            if not result["unimplemented"]:  # GreetMany came after step 03 itself (issue 24)
                sample.many_calls_per_second = result["per_second"]
            sample.failed += result["errors"]
            result = measure(running, "chat", STREAMING_CONCURRENCY, seconds, warmup)
            sample.chat_round_trips_per_second = result["per_second"]
            sample.failed += result["errors"]
        sample.peak_rss_mb = sum(peak_rss_mb(pid) for pid in running.pids)
    return sample


# --- The leak check ------------------------------------------------------------------------

LEAK_STEPS = ("03", "07", "17")
LEAK_CALLS = 20_000
LEAK_CHAT_MESSAGES = 3  # a short chat


def rss_mb(pid: int) -> float:
    """The memory the process holds now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_calls(running: Running, kind: str, calls: int) -> None:
    command = [sys.executable, str(Path(__file__).resolve()), "load", "--kind", kind]
    command += ["--target", running.target, "--concurrency", "16", "--calls", str(calls)]
    command += ["--messages", str(LEAK_CHAT_MESSAGES), "--seconds", "0", "--warmup", "0"]
    if running.ca:
        command += ["--ca", running.ca]
    env = {**os.environ, "BENCH_TOKEN": running.token or "", "GRPC_VERBOSITY": "NONE"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    failed = json.loads(result.stdout.splitlines()[-1])["errors"] if result.returncode == 0 else -1
    if failed:
        raise RuntimeError(f"{failed} of the leak check's calls failed: {result.stderr}")


def leak_check(steps: list[Step], calls: int = LEAK_CALLS) -> str:
    """Each step's memory before and after 20,000 short chats and 20,000 unary calls, after a
    warm-up of 1,000 of each (gRPC and Python fill their pools and caches first)."""
    lines = [
        f"| step | after warm-up MB | after {calls:,} unary calls | after {calls:,} chats "
        "| change MB |",
        "|---|---|---|---|---|",
    ]
    by_process = []  # a step of several processes: what each one's memory did
    for step in steps:
        with tempfile.TemporaryDirectory(prefix="bench-leaks-") as workdir:
            with step_servers(step, Path(workdir)) as running:
                run_calls(running, "unary", 1000)
                run_calls(running, "chat", 1000)
                before = [rss_mb(pid) for pid in running.pids]
                run_calls(running, "unary", calls)
                after_unary = [rss_mb(pid) for pid in running.pids]
                run_calls(running, "chat", calls)
                after_chats = [rss_mb(pid) for pid in running.pids]
        lines.append(
            f"| {step.label} | {sum(before):.1f} | {sum(after_unary):.1f} "
            f"| {sum(after_chats):.1f} | {sum(after_chats) - sum(before):+.1f} |"
        )
        print(lines[-1], flush=True)
        if len(running.pids) > 1:
            changes = zip(running.names, before, after_chats, strict=True)
            each = ", ".join(f"{name} {a:.1f} → {b:.1f}" for name, a, b in changes)
            by_process.append(
                f"- step {step.label}, MB after the warm-up → after the chats: {each}"
            )
    return "\n".join([*lines, "", *by_process])


# --- One step kept running, for a profiler -------------------------------------------------


def serve(step: Step) -> None:
    """Start the step as the bench does, print its processes and the command that loads it
    as the bench does, and keep it running until Ctrl-C (or SIGTERM, SIGHUP): the way it
    ends, whenever it comes (exit 0)."""
    with (
        contextlib.suppress(KeyboardInterrupt),
        tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir,
    ):
        with step_servers(step, Path(workdir)) as running:
            for name, pid in zip(running.names, running.pids, strict=True):
                print(f"{name}: pid {pid}")
            token = f"BENCH_TOKEN={running.token} " if running.token else ""
            ca = f" --ca {running.ca}" if running.ca else ""
            print(
                f"load it: {token}python tools/bench.py load --target {running.target}{ca} "
                "--concurrency 16 --warmup 1 --seconds 30\nCtrl-C stops the step.",
                flush=True,
            )
            until_stopped()


# --- The table -----------------------------------------------------------------------------


def median_spread(values: list[float], digits: int = 0) -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(samples: dict[str, list[Sample]]) -> str:
    def rate(name: str) -> float:
        return statistics.median(s.calls_per_second[16] for s in samples[name])

    def spread(runs: list[Sample], figure) -> str:
        values = [figure(s) for s in runs]
        return "–" if None in values else median_spread(values)

    lines = [
        "| variant | calls/s @16 | calls/s @64 | p50 / p99 ms @16 | CPU µs/call @16 "
        "| × step 01 @16 | × bare @16 | stream msgs/s | GreetMany calls/s | chat round trips/s "
        "| peak RSS MB | failed calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in samples.items():
        p50 = statistics.median(s.p50_ms for s in runs)
        p99 = statistics.median(s.p99_ms for s in runs)
        cells = [
            name,
            spread(runs, lambda s: s.calls_per_second[16]),
            spread(runs, lambda s: s.calls_per_second.get(64)),
            f"{p50:.2f} / {p99:.2f}",
            spread(runs, lambda s: s.cpu_us_per_call),
            f"{rate(name) / rate('01'):.2f}" if "01" in samples else "–",
            f"{rate(name) / rate('bare'):.2f}",
            spread(runs, lambda s: s.stream_messages_per_second),
            spread(runs, lambda s: s.many_calls_per_second),
            spread(runs, lambda s: s.chat_round_trips_per_second),
            f"{statistics.median(s.peak_rss_mb for s in runs):.0f}",
            str(sum(s.failed for s in runs)),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, load average before the run {load}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["load"]:
        parser = argparse.ArgumentParser(prog="bench.py load")
        parser.add_argument("--target", required=True)
        parser.add_argument("--concurrency", type=int, required=True)
        parser.add_argument("--seconds", type=float, required=True)
        parser.add_argument("--warmup", type=float, required=True)
        parser.add_argument("--ca")
        parser.add_argument("--kind", choices=sorted([*METHODS, "rest"]), default="unary")
        parser.add_argument("--calls", type=int, default=0, help="this many, not --seconds")
        parser.add_argument("--messages", type=int, default=CHAT_MESSAGES, help="per chat")
        args = parser.parse_args(argv[1:])
        args.token = os.environ.get("BENCH_TOKEN")  # never on the command line (ps shows it)
        args.ca = Path(args.ca).read_bytes() if args.ca else None
        print(json.dumps(asyncio.run(generate_load(args))), flush=True)
        return 0
    if argv[:2] == ["--port", "0"]:  # the bare server, as ServerProcess starts a server
        asyncio.run(serve_bare())
        return 0
    if argv[:1] == ["leaks"]:
        parser = argparse.ArgumentParser(prog="bench.py leaks")
        parser.add_argument("steps", nargs="*", metavar="NN", default=list(LEAK_STEPS))
        parser.add_argument("--out", type=Path, default=ROOT / "bench")
        parser.add_argument("--calls", type=int, default=LEAK_CALLS, help="of each kind")
        args = parser.parse_args(argv[1:])
        about = machine()
        print(f"leak check: {about}", flush=True)
        found = leak_check(select_steps(args.steps), args.calls)
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        report = (
            f"# Does a server keep memory it no longer needs?\n\n"
            f"Measured by `make bench` on {date}: {about}.\n\n"
            f"Memory held (VmRSS) by every process of the step, added up: after a warm-up of "
            f"1,000 `SayHello` calls and 1,000 chats, after {args.calls:,} more calls, and "
            f"after {args.calls:,} chats of {LEAK_CHAT_MESSAGES} messages each (16 at a "
            f"time).\n\n{found}\n"
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "leaks.md").write_text(report)
        print(report)
        return 0
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="bench.py serve")
        parser.add_argument("step", metavar="NN")
        serve(find_step(parser.parse_args(argv[1:]).step))
        return 0
    parser = argparse.ArgumentParser(description="What each step's features cost per call.")
    parser.add_argument("steps", nargs="*", metavar="NN")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument(
        "--unary-only",
        action="store_true",
        help="SayHello from 16 callers only: quicker rounds, so more of them for a small "
        "difference",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also run each step as it is at git revision REV, beside it: before and after "
        "a change, measured in one run",
    )
    args = parser.parse_args(argv)
    steps = select_steps(args.steps)
    if args.steps and all(s.number != 1 for s in steps):
        steps = [find_step("01"), *steps]  # the ratios need step 01
    about = machine()
    print(f"bench: {about}", flush=True)
    with contextlib.ExitStack() as stack:
        before = stack.enter_context(checkout(args.against)) if args.against else None
        return run_bench(args, about, variants_of(steps, before, args.against))


@contextlib.contextmanager
def checkout(revision: str):
    """The repository's files at `revision`, in a temporary folder (generated code is
    checked in, so its steps run as they are)."""
    with tempfile.TemporaryDirectory(prefix="bench-against-") as folder:
        archive = subprocess.run(
            ["git", "archive", revision], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        yield Path(folder)


def variants_of(steps: list[Step], before: Path | None, revision: str | None) -> dict:
    """{name: (step number, start, REST or not)}: the bare server, then each step (each one
    right after its version at `revision`, when there is one)."""
    variants = {"bare": (0, lambda _: bare_server(), False)}
    for step in steps:
        if before is not None:
            old = Step(step.number, before / step.name)
            variants[f"{step.label}@{revision}"] = (
                step.number,
                lambda workdir, old=old: step_servers(old, workdir),
                False,
            )
        start = functools.partial(step_servers, step)
        variants[step.label] = (step.number, start, False)
        if (step.path / "deploy" / "greeter.pb").exists():  # REST through Envoy, step 19 on
            variants[f"{step.label} rest"] = (step.number, start, True)
        if (step.path / "ratelimit.py").exists():  # the limits shared, as compose runs them
            variants[f"{step.label}+redis"] = (
                step.number,
                lambda workdir, s=step: step_servers(s, workdir, shared_limits=True),
                False,
            )
    return variants


def run_bench(args: argparse.Namespace, about: str, variants: dict) -> int:
    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    for round_number in range(1, args.rounds + 1):
        # Every other round in reverse order: no variant always runs first or last.
        order = list(variants.items())
        for name, (number, start, rest) in order if round_number % 2 else reversed(order):
            sample = run_variant(start, number, args.seconds, args.warmup, args.unary_only, rest)
            samples[name].append(sample)
            print(
                f"round {round_number} {name}: {sample.calls_per_second[16]:.0f} calls/s @16, "
                f"{sample.cpu_us_per_call:.0f} µs CPU/call",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = (
        "`SayHello` from 16 concurrent callers only (`--unary-only`)."
        if args.unary_only
        else "`SayHello` from 16 and 64 concurrent callers; `StreamGreetings` (10 replies each, "
        "no pause between them), `GreetMany` (10 names each) and `Chat` (one message, one "
        "reply, then the next) from 16."
    )
    report = (
        f"# What each step costs per call\n\n"
        f"Measured by `make bench` on {date}: {about}.\n\n"
        f"{load} "
        f"CPU time: every process of the variant (Greeters, Logger, Envoy, Redis), per `SayHello` "
        f"call. {args.rounds} round(s), variants alternated within each (every other round in "
        f"reverse order), {args.seconds:g} s "
        f"measured after {args.warmup:g} s of warm-up per run; medians, with the spread over "
        f"the rounds in brackets. The chart: [cost.png](cost.png).\n\n{table(samples)}\n"
    )
    (args.out / "results.md").write_text(report)
    results = {"when": date, "machine": about, "variants": medians(samples)}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    draw_chart(results, args.out / "cost.png")
    print(report)
    return 0


def median_or_none(values: list[float | None]) -> float | None:
    return None if None in values else statistics.median(values)


def medians(samples: dict[str, list[Sample]]) -> list[dict]:
    """Each variant's median figures (and the CPU time's spread), for the chart and for
    anyone who wants to compare runs without parsing the table."""
    rows = []
    for name, runs in samples.items():
        cpu = [s.cpu_us_per_call for s in runs]
        rows.append(
            {
                "name": name,
                "calls_per_second_16": statistics.median(s.calls_per_second[16] for s in runs),
                "calls_per_second_64": median_or_none([s.calls_per_second.get(64) for s in runs]),
                "cpu_us_per_call": statistics.median(cpu),
                "cpu_us_per_call_min": min(cpu),
                "cpu_us_per_call_max": max(cpu),
                "peak_rss_mb": statistics.median(s.peak_rss_mb for s in runs),
                "failed": sum(s.failed for s in runs),
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:], stopped=130))
