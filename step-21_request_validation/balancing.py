"""Client-side load balancing: a channel spreads its calls over every replica its target
names, round robin, and sends none to a replica whose health service says it is not
serving. A reply says which replica served it, in the `x-served-by` trailer.

Targets (gRPC's name syntax, https://github.com/grpc/grpc/blob/master/doc/naming.md):

    127.0.0.1:50051                          one address
    ipv4:127.0.0.1:50051,127.0.0.1:50061     a fixed list of replicas
    dns:///greeter.default.svc:50051         every address a DNS name resolves to (in
                                             Kubernetes: a headless service)
"""

import json
from collections.abc import Sequence

import keepalive
import rebalancing
from retries import method_config

SERVED_BY_KEY = "x-served-by"

# gRPC's service config (https://github.com/grpc/grpc/blob/master/doc/service_config.md):
# round robin over every address of the target instead of gRPC's default, pick_first (one
# connection, to the first address that answers); and client-side health checking (gRFC
# A17): the channel watches each replica's grpc.health.v1 service, and a replica that says
# NOT_SERVING gets no new calls. Service "" is the health of the whole server.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
}
# A replica that went away is reconnected with a growing backoff, 1 s at first; gRPC's cap
# is 120 s. Capped here, so a replica that comes back gets calls again within seconds.
MAX_RECONNECT_BACKOFF_MS = 5000


def replica_target(text: str) -> str:
    """A target as a setting: a list of addresses must say its scheme, which gRPC would
    only report as "Misformatted domain name" on the first call."""
    if "," in text and not text.startswith(("ipv4:", "ipv6:")):
        raise ValueError("a list of addresses needs ipv4: before it: ipv4:HOST:PORT,HOST:PORT")
    return text


def tls_authority(target: str) -> str | None:
    """The name TLS must find in the servers' certificate, when gRPC cannot tell it from the
    target: for an address list, the host of its first address (every replica then needs a
    certificate for it, as gen_certs.sh makes for 127.0.0.1). None: gRPC's own choice."""
    scheme, _, addresses = target.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    first = addresses.split(",")[0]
    return first.rpartition(":")[0].strip("[]")


def channel_options(target: str, retried: Sequence[dict] = ()) -> list[tuple[str, object]]:
    """The options of a load-balanced channel to `target`, retrying the `retried` methods
    (retries.py)."""
    config = SERVICE_CONFIG | (method_config(list(retried)) if retried else {})
    options: list[tuple[str, object]] = [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        *keepalive.CLIENT_OPTIONS,  # pings after 20 s of silence (keepalive.py)
        *rebalancing.CLIENT_OPTIONS,  # asks DNS again when a connection ends (rebalancing.py)
    ]
    if authority := tls_authority(target):
        options.append(("grpc.default_authority", authority))
    return options


def served_by(trailing_metadata) -> str | None:
    """The replica that answered a call, from its trailing metadata."""
    return dict(trailing_metadata or ()).get(SERVED_BY_KEY)
