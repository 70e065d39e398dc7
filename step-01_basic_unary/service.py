"""The Greeter service: what each RPC does and which input it accepts."""

import grpc

from greeter.v1 import greeter_pb2, greeter_pb2_grpc

# A name, not a document: long enough for any real name, short enough that nobody can
# make the server build, log or send back megabytes.
MAX_NAME_LENGTH = 100


def name_problem(name: str) -> str | None:
    """Why `name` cannot be greeted, in words a caller understands; None when it is fine."""
    if not name.strip():
        return "name must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"name must be at most {MAX_NAME_LENGTH} characters (got {len(name)})"
    if not name.isprintable():
        # Newlines and other control characters would let a caller forge lines in our logs.
        return "name must be printable text (no control characters such as newlines)"
    return None


async def require_valid_name(name: str, context: grpc.aio.ServicerContext) -> None:
    """End the RPC with INVALID_ARGUMENT unless `name` is acceptable."""
    problem = name_problem(name)
    if problem is not None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


class Greeter(greeter_pb2_grpc.GreeterServicer):
    async def SayHello(self, request, context):
        await require_valid_name(request.name, context)
        return greeter_pb2.HelloReply(message=f"Hello, {request.name}!")
