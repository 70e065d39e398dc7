"""The standard gRPC health service (grpc.health.v1.Health) for load balancers, Kubernetes
probes and grpcurl: grpcio-health-checking's asyncio servicer, with what a server here needs
around it. NOT_SERVING until the server is ready, NOT_SERVING from the moment shutdown
begins (the library's `enter_graceful_shutdown`), a Check of an unknown service answered
with its name, and Watch streams that end when the server stops (the library's never do).

Its Watch writes with `context.write`; the interceptors wrap it as they wrap our own
generators (interceptors.yielded, step 04).
"""

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health


class HealthService(health.aio.HealthServicer):
    """The health of the whole server (service "") and of each named service."""

    def __init__(self, services: list[str]):
        super().__init__()
        self.services = ["", *services]
        self._watches: set[asyncio.Task] = set()  # the tasks of the open Watch calls
        self._watches_end = False

    @classmethod
    async def starting(cls, services: list[str]) -> "HealthService":
        """NOT_SERVING for the server and every service until `set_serving`: a probe never
        sees a half-started server."""
        servicer = cls(services)
        await servicer._set_every(NOT_SERVING)
        return servicer

    async def _set_every(self, status: int) -> None:
        for service in self.services:
            await self.set(service, status)  # ignored once shutdown has begun

    async def set_serving(self) -> None:
        await self._set_every(SERVING)

    async def end_watches(self) -> None:
        """End every Watch stream, before the server stops: server.stop(grace) waits for
        every open call, and a Watch never ends on its own. Until then each stays open
        through the drain, so that a watcher sees NOT_SERVING rather than a stream that
        ends (it would open a new one at once, again and again)."""
        self._watches_end = True
        for watch in self._watches:
            watch.cancel()

    async def Check(self, request, context):
        if request.service not in self.services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return await super().Check(request, context)

    async def Watch(self, request, context):
        # The current status first, then each change; an unknown service is not an error
        # here (the spec says so): it reports SERVICE_UNKNOWN, in case it appears later.
        if self._watches_end:
            return
        watch = asyncio.current_task()
        assert watch is not None  # a handler always runs in a task
        self._watches.add(watch)
        try:
            await super().Watch(request, context)
        except asyncio.CancelledError:
            if not self._watches_end:
                raise  # the client went away, or the server cut the call
            watch.uncancel()  # ended by end_watches: the call ends with OK
        finally:
            self._watches.discard(watch)
