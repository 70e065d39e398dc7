"""Rebalancing after a scale-up: connections that end, so clients find new replicas.

A gRPC channel keeps its HTTP/2 connections for as long as they work, and asks DNS for the
replicas again only when one of them breaks. Behind a Kubernetes headless Service
(`dns:///greeter:50051`, step 12) a replica added by a scale-up would get no calls from the
clients already running. So each server closes every client's connection after
`max_connection_age` (gRPC adds ±10% jitter, so they do not all reconnect at once) with an
HTTP/2 GOAWAY: the calls already open go on, new ones go to a new connection, and the
channel asks DNS again (gRFC A9).

On the client, gRPC asks DNS at most once every 30 s by default, however often a
connection ends: the channel options below lower that, so the new replica's address arrives
with the first reconnection after it appeared (step 20's README, "How it scales").
"""

from keepalive import milliseconds

# How often a channel may ask DNS again, at most: once per connection that ends.
MIN_SECONDS_BETWEEN_RESOLUTIONS = 1.0
# What gRPC means by "no limit" for the grace (the C core's own default, INT_MAX ms).
NO_LIMIT_MS = 2**31 - 1

CLIENT_OPTIONS = [
    ("grpc.dns_min_time_between_resolutions_ms", milliseconds(MIN_SECONDS_BETWEEN_RESOLUTIONS))
]


def server_options(max_age: float, grace: float | None) -> list[tuple[str, int]]:
    """The grpc.aio.server options that end each connection after `max_age` seconds, its
    open calls `grace` seconds later (None: when they end)."""
    return [
        ("grpc.max_connection_age_ms", milliseconds(max_age)),
        ("grpc.max_connection_age_grace_ms", NO_LIMIT_MS if grace is None else milliseconds(grace)),
    ]
