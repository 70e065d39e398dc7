"""The standard gRPC health service (grpc.health.v1.Health) for load balancers, Kubernetes
probes and grpcurl: SERVING once the server is ready, NOT_SERVING from the moment shutdown
begins.

grpcio-health-checking ships an asyncio servicer, but its Watch writes with context.write.
Interceptors that wrap streaming handlers as async generators (our logging one, and
OpenTelemetry's in step 09) need a Watch that yields, so this module implements the same
protocol with one.
"""

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health


class HealthService(health_pb2_grpc.HealthServicer):
    """The health of the whole server (service "") and of each named service."""

    def __init__(self, services: list[str]):
        # NOT_SERVING until the server says it is ready: a probe never sees a half-started server.
        self._status = dict.fromkeys(["", *services], NOT_SERVING)
        self._shutting_down = False
        self._watches_end = False
        self._version = 0  # bumped on every change, so a watcher never misses one
        self._changed = asyncio.Condition()

    async def _set_all(self, status: int) -> None:
        async with self._changed:
            self._status = dict.fromkeys(self._status, status)
            self._version += 1
            self._changed.notify_all()

    async def set_serving(self) -> None:
        if not self._shutting_down:
            await self._set_all(SERVING)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good, told to every Watch, which stays open: a watcher that sees
        its stream end would open a new one at once, again and again through the drain."""
        self._shutting_down = True
        await self._set_all(NOT_SERVING)

    async def end_watches(self) -> None:
        """End every Watch stream, before the server stops: server.stop(grace) waits for
        every open call, and a Watch never ends on its own."""
        async with self._changed:
            self._watches_end = True
            self._version += 1
            self._changed.notify_all()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        # The current status first, then each change. An unknown service is not an error
        # here (the spec says so): it reports SERVICE_UNKNOWN, in case it appears later.
        seen_version, last_sent = -1, None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen_version: self._version != seen)
                seen_version = self._version
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                ending = self._watches_end
            if status != last_sent:
                yield health_pb2.HealthCheckResponse(status=status)
                last_sent = status
            if ending:  # the server is about to stop (end_watches)
                return
