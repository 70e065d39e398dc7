"""Keepalive: HTTP/2 pings that keep a quiet connection open and find one whose peer is
gone, and the limit a server puts on its clients' pings (gRFC A8 for clients, A9 for
servers; step 07's README, "Keepalive").

A server accepts a client's pings only so often. gRPC's default is one every 5 minutes: a
client that pings more often (many production clients and proxies ping every 10 to 30 s)
gets two strikes, then GOAWAY `too_many_pings`, and every call on the connection fails,
a health Watch held open included. So the servers here accept pings every
`permit_keepalive_time` seconds (10 by default), and ping a silent client themselves after
`keepalive_time` to find one that is gone without closing its connection.
"""

# How long a ping may go unanswered before the connection is taken for dead.
KEEPALIVE_TIMEOUT_SECONDS = 20
# Pings too close together that a server lets pass before it sends GOAWAY (gRPC's default).
MAX_PING_STRIKES = 2


def milliseconds(seconds: float) -> int:
    return round(seconds * 1000)


def server_options(keepalive_time: float, permit_keepalive_time: float) -> list[tuple[str, int]]:
    """The grpc.aio.server options of both sides of the policy above."""
    return [
        ("grpc.keepalive_time_ms", milliseconds(keepalive_time)),
        ("grpc.keepalive_timeout_ms", milliseconds(KEEPALIVE_TIMEOUT_SECONDS)),
        ("grpc.http2.min_ping_interval_without_data_ms", milliseconds(permit_keepalive_time)),
        ("grpc.keepalive_permit_without_calls", 1),  # an idle client may ping too
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


# A client's pings: after 20 s of silence, also with no call open, as long as the connection
# lasts (by default gRPC stops after two pings without data). Well above the servers'
# minimum, so a server with these defaults never sends this client away.
CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", milliseconds(KEEPALIVE_TIMEOUT_SECONDS)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
