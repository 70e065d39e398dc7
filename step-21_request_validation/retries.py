"""Retries, and deadlines that add up.

Transparent retries are gRPC's own, switched on per method by the service config (gRFC A6,
https://github.com/grpc/proposal/blob/master/A6-client-retries.md): a call that fails with
UNAVAILABLE (nothing reached the server's handler, or the server said it cannot serve) is
sent again, up to `maxAttempts` in all, after a backoff with jitter, within the call's own
deadline. Only methods that are safe to repeat are listed. `retryThrottling` stops retries
when too many calls fail: retries must never multiply the load on a server that is down.

Application-level retries (`report_attempts`, tenacity) are for what a service config cannot
say: the Greeter gives each Logger attempt a deadline of its own, so that a stuck replica
costs one short attempt, and the next attempt goes to another replica.
"""

import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

# What a transparent retry is for: the call did not happen. Never a code that means the call
# ran and failed (INTERNAL, UNKNOWN) or was the caller's mistake (INVALID_ARGUMENT).
RETRYABLE_CODES = ["UNAVAILABLE"]
MAX_ATTEMPTS = 3  # the first and two retries (gRPC caps it at 5)
RETRY_POLICY = {
    "maxAttempts": MAX_ATTEMPTS,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": RETRYABLE_CODES,
}
# A token bucket of 100: each failed attempt takes 1, each success gives 0.1 back; below half
# (50) the channel stops retrying until successes refill it. Sized for a busy channel: one
# replica of two dying with a few dozen calls in flight must not use it up (those calls are
# exactly what retries are for), while a dependency that is down drains it within 50 calls.
RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 0.1}

# Methods safe to send twice. SayHello, StreamGreetings and GreetMany change nothing (the
# Logger entry is idempotent by request id); a chat is a conversation, never replayed. A
# client stream can be retried because gRPC keeps what it sent, to send it again (up to
# 256 KiB a call, `grpc.per_rpc_retry_buffer_size`; a call that sent more is not retried,
# and GreetMany's 100 names of 100 characters are at most 40 KiB). The Logger's Record
# stores a request id once, and ListRecent only reads.
GREETER_RETRIED = [
    {"service": "greeter.v1.Greeter", "method": "SayHello"},
    {"service": "greeter.v1.Greeter", "method": "StreamGreetings"},
    {"service": "greeter.v1.Greeter", "method": "GreetMany"},
    {"service": "greeter.v2.GreeterService", "method": "SayHello"},
    {"service": "greeter.v2.GreeterService", "method": "StreamGreetings"},
]
LOGGER_RETRIED = [{"service": "logger.v1.Logger"}]

# What the Greeter keeps of its caller's deadline for itself: the Logger gets what is left
# minus this, never more than its own timeout (propagation.py applies it to every call).
DEADLINE_MARGIN_SECONDS = 0.05

# The Greeter's own attempts at a report: each with a deadline of its own (a fraction of the
# Logger timeout), backing off up to 100 ms, with full jitter, in between.
REPORT_ATTEMPTS = 3
MAX_REPORT_BACKOFF_SECONDS = 0.1


def method_config(retried: list[dict]) -> dict:
    """The service-config entries that turn retries on for `retried` methods."""
    return {
        "methodConfig": [{"name": retried, "retryPolicy": RETRY_POLICY}],
        "retryThrottling": RETRY_THROTTLING,
    }


def is_worth_another_attempt(error: BaseException) -> bool:
    """An attempt that ran out of its own time: another, on the next replica, may succeed.
    Or one the Logger refused for its rate limit with a RetryInfo: another, once that delay
    has passed, will be let through (step 18). UNAVAILABLE is not retried here: gRPC has
    retried it already (retrying at two layers would multiply the attempts)."""
    if not isinstance(error, grpc.aio.AioRpcError):
        return False
    return error.code() == grpc.StatusCode.DEADLINE_EXCEEDED or retry_delay(error) is not None


def report_attempts(budget_seconds: float) -> AsyncRetrying:
    """Attempts of one report, all within `budget_seconds` from now: tenacity stops when
    another wait and attempt would not fit, and re-raises the last error. The wait is the
    one a refusal's RetryInfo gives, or a short backoff with full jitter."""
    ends = time.monotonic() + budget_seconds
    backoff = wait_random_exponential(multiplier=0.01, max=MAX_REPORT_BACKOFF_SECONDS)

    def told_to_wait(retry_state: RetryCallState) -> float | None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        return retry_delay(error) if isinstance(error, grpc.aio.AioRpcError) else None

    def wait(retry_state: RetryCallState) -> float:
        told = told_to_wait(retry_state)
        return backoff(retry_state) if told is None else told

    def out_of_attempts_or_time(retry_state: RetryCallState) -> bool:
        told = told_to_wait(retry_state)
        longest_wait = MAX_REPORT_BACKOFF_SECONDS if told is None else told
        return (
            retry_state.attempt_number >= REPORT_ATTEMPTS or time.monotonic() + longest_wait >= ends
        )

    return AsyncRetrying(
        retry=retry_if_exception(is_worth_another_attempt),
        stop=out_of_attempts_or_time,
        wait=wait,
        reraise=True,
    )


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The seconds a RESOURCE_EXHAUSTED call's RetryInfo says to wait; None without one."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None
