"""A circuit breaker around the Greeter's calls to the Logger (pybreaker).

When the Logger is down or stuck, every greeting would wait for a Logger call that is bound to
fail. The breaker notices the failures and stops calling for a while:

    closed ──(GREETER_LOGGER_BREAKER_FAILURES dependency failures in a row)──▶ open
    open ──(GREETER_LOGGER_BREAKER_RESET seconds pass, then a report comes)──▶ half-open
    half-open ──(its one trial call succeeds)──▶ closed
    half-open ──(its one trial call fails)──▶ open

While it is open, a report skips the Logger at once and is counted as skipped. See
step 14's README, "The circuit breaker".
"""

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pybreaker
from prometheus_client import CollectorRegistry, Counter, Gauge

from retries import retry_delay

log = logging.getLogger("greeter.breaker")
T = TypeVar("T")

# What says the Logger is in trouble: it could not be reached, did not answer in time, or has
# no room. Any other code (INVALID_ARGUMENT, UNAUTHENTICATED...) is an answer: the Logger works.
# So is its rate limit (step 18): a RESOURCE_EXHAUSTED with a RetryInfo says "this caller,
# not now", from a Logger that works; `is_dependency_failure` leaves it out.
DEPENDENCY_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# The state as a number, worst last, so that a graph of it reads at a glance.
STATE_VALUES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


class LoggerSkipped(Exception):
    """The breaker is open, or its one trial call is in flight: the Logger was not called."""


def is_dependency_failure(error: BaseException, deadline_was_ours: bool) -> bool:
    """Whether `error` counts against the Logger. A DEADLINE_EXCEEDED counts only when the call
    had the Greeter's whole Logger timeout: when the caller's own deadline cut it short, the
    caller ran out of time, and callers in a hurry must not open the breaker for everyone."""
    if not isinstance(error, grpc.aio.AioRpcError) or error.code() not in DEPENDENCY_FAILURES:
        return False
    if retry_delay(error) is not None:  # a rate limit's answer: the Logger works
        return False
    return deadline_was_ours or error.code() != grpc.StatusCode.DEADLINE_EXCEEDED


class StateReporter(pybreaker.CircuitBreakerListener):
    """Each change of state: one log line and the state gauge."""

    def __init__(self, state: Gauge, reset_seconds: float):
        self._state, self._reset_seconds = state, reset_seconds
        self.last_failure = "-"
        self.skipped_while_open = 0

    def failure(self, breaker: pybreaker.CircuitBreaker, error: BaseException) -> None:
        # A gRPC error, or anything else that left the call (counted too: the report failed).
        if isinstance(error, grpc.aio.AioRpcError):
            self.last_failure = error.code().name
        else:
            self.last_failure = type(error).__name__

    def state_change(self, breaker, old, new) -> None:
        if old is not None and old.name == new.name:
            return  # a late failure of a call made before it opened: open stays open
        self._state.set(STATE_VALUES[new.name])
        skip = f"greetings skip the Logger for {self._reset_seconds:g} s"
        if new.name == pybreaker.STATE_OPEN and old.name == pybreaker.STATE_HALF_OPEN:
            log.warning(
                "Logger breaker open again: the trial call failed with %s; %s",
                self.last_failure,
                skip,
            )
        elif new.name == pybreaker.STATE_OPEN:
            log.warning(
                "Logger breaker open: %d dependency failures in a row, the last %s; %s",
                breaker.fail_max,
                self.last_failure,
                skip,
            )
        elif new.name == pybreaker.STATE_HALF_OPEN:
            log.info("Logger breaker half-open: one trial call goes to the Logger")
        else:
            log.info(
                "Logger breaker closed: the trial call succeeded; %d greetings skipped the "
                "Logger while it was open",
                self.skipped_while_open,
            )
            self.skipped_while_open = 0


class LoggerBreaker:
    """Runs each report to the Logger through a pybreaker breaker (step 14's README, "The
    circuit breaker"). pybreaker has no asyncio support, but its `calling()` context around an
    `await` works: the state changes happen on the event loop's one thread."""

    def __init__(self, failures: int, reset_seconds: float, registry: CollectorRegistry):
        state = Gauge(
            "greeter_logger_breaker_state",
            "The Logger circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=registry,
        )
        self._skipped = Counter(
            "greeter_logger_breaker_skipped_total",
            "Greetings not reported because the Logger circuit breaker was open.",
            registry=registry,
        )
        self._reporter = StateReporter(state, reset_seconds)
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=failures,
            reset_timeout=reset_seconds,
            listeners=[self._reporter],
            name="logger",
            # A failure that opens the breaker is still the call's own error (and is counted as
            # a failed call, not a skipped one).
            throw_new_error_on_trip=False,
        )
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        return self._breaker.current_state

    async def call(self, logger_call: Callable[[], Awaitable[T]], *, deadline_was_ours: bool) -> T:
        """`await logger_call()` if the breaker lets it through, else LoggerSkipped at once.
        Its errors are raised as they are; only dependency failures count against the Logger
        (`is_dependency_failure`)."""
        # pybreaker lets every call through while half-open; one trial is enough to learn
        # whether the Logger is back, so the others skip it until the trial has its answer.
        if self._trial_in_flight:
            raise self._skip()
        trial = self.state != pybreaker.STATE_CLOSED  # (or skipped at once if still open)
        self._trial_in_flight = trial
        try:
            with self._breaker.calling():
                try:
                    return await logger_call()
                except grpc.aio.AioRpcError as error:
                    if is_dependency_failure(error, deadline_was_ours):
                        raise  # pybreaker counts it
                    answered = error  # the Logger answered: for pybreaker, a success
            raise answered
        except pybreaker.CircuitBreakerError:
            raise self._skip() from None
        finally:
            if trial:
                self._trial_in_flight = False

    def _skip(self) -> LoggerSkipped:
        self._skipped.inc()
        self._reporter.skipped_while_open += 1
        return LoggerSkipped()
