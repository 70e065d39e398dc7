"""The container's health check: one call to the standard gRPC health service of the
server in this container. Exit 0 when it says SERVING, 1 otherwise.

    python healthcheck.py [PORT]   (the Dockerfile's HEALTHCHECK runs it)

PORT defaults to GREETER_PORT (or 50051); docker-compose.yml passes the Logger's (step 10 on).

Over TLS when the CA file the client uses exists (GREETER_TLS_CA, default certs/ca.crt;
steps 06 on), in plaintext before. A server without a health service (steps 01 to 06)
answers UNIMPLEMENTED: it is up, which is all such a server can say.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # one line of output, not gRPC's own logs

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GREETER_PORT") or 50051
    target = f"localhost:{port}"
    ca = Path(os.environ.get("GREETER_TLS_CA") or "certs/ca.crt")
    if ca.exists():
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                print("up (no health service in this step)")
                return 0
            print(f"unhealthy: {err.code().name}: {err.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
