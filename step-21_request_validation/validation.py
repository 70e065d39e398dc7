"""Request validation from the protos: the rules are `buf.validate` annotations on the
request fields (protos/, with names/v1/names.proto for the rules every name follows), and
one interceptor checks every request, and every message of a client stream, with
protovalidate before any handler runs.

A violation ends the call with INVALID_ARGUMENT: its message says each violated field in
words (`name must not be empty`), and a `google.rpc.BadRequest` detail lists them one by one
(field and description), for clients, grpcurl and REST callers to read
(https://google.aip.dev/193). A client stream is refused once the client stops sending
(drain.py). Step 21's README, "How it works".
"""

import contextlib

import grpc
import protovalidate
from google.protobuf import any_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from google.rpc import code_pb2, status_pb2
from google.rpc.error_details_pb2 import BadRequest
from grpc_status import rpc_status

from drain import until_the_client_stops_sending
from interceptors import OncePerMethod, wrap_handler


def field_path(violation: protovalidate.Violation) -> str:
    """The violated field as the request names it: `person.given_name`, `greeting.names[2]`;
    "" for a rule of the whole request."""
    parts = []
    path = violation.proto.field  # unset for a rule of the whole message
    for element in path.elements if path is not None else ():
        # protovalidate 2's messages are protobuf-py's: a oneof is a value with its field.
        subscript = element.subscript
        index = f"[{subscript.value}]" if subscript is not None else ""
        parts.append(f"{element.field_name}{index}")
    return ".".join(parts)


def field_violations(request) -> list[BadRequest.FieldViolation]:
    """What is wrong with `request`, by its protos' rules: one entry per violated rule, its
    reason the rule's id as AIP-193 spells a reason (`name.not_blank`: NAME_NOT_BLANK), for
    programs to tell the cases apart."""
    return [
        BadRequest.FieldViolation(
            field=field_path(violation),
            description=violation.proto.message,
            reason=violation.proto.rule_id.upper().replace(".", "_"),
        )
        for violation in protovalidate.collect_violations(request)
    ]


def sentence(violation: BadRequest.FieldViolation) -> str:
    """A violation in words. The rules of these protos describe themselves after the field's
    name ("must not be empty"); protovalidate's own start with "value" ("value is
    required"), which the field's name replaces."""
    description = violation.description.removeprefix("value ")
    return f"{violation.field} {description}".strip()


def invalid_argument(violations: list[BadRequest.FieldViolation]) -> status_pb2.Status:
    """INVALID_ARGUMENT with every violation in its message and in a BadRequest detail."""
    detail = any_pb2.Any()
    detail.Pack(BadRequest(field_violations=violations))
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="; ".join(sentence(v) for v in violations),
        details=[detail],
    )


def check_the_rules_compile(descriptors: tuple[ServiceDescriptor, ...]) -> None:
    """Validate an empty request of every method once: a rule that does not compile (a CEL
    typo) stops the server at start-up, instead of failing calls later."""
    for service in descriptors:
        for method in service.methods:
            protovalidate.collect_violations(GetMessageClass(method.input_type)())


class ServerValidator(grpc.aio.ServerInterceptor):
    """Refuses a request that breaks its protos' rules before the handler sees it. Calls to
    the `exempt` services (health, reflection: their requests carry no rules) are let by."""

    def __init__(self, descriptors: tuple[ServiceDescriptor, ...], exempt: frozenset[str]):
        check_the_rules_compile(descriptors)
        self._exempt = exempt
        self._wrapped = OncePerMethod(self._wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.split("/")[1]
        if handler is None or service in self._exempt:
            return handler
        return self._wrapped(handler_call_details.method, handler)

    @staticmethod
    async def _refuse(context, violations, requests=None) -> None:
        if requests is not None:  # a client stream: once the client stops writing (drain.py)
            await until_the_client_stops_sending(requests)
        status = rpc_status.to_status(invalid_argument(violations))
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming_requests = handler.request_streaming

        async def checked(requests, context):
            """A client stream's requests, each one checked as it arrives."""
            async for request in requests:
                if violations := field_violations(request):
                    await self._refuse(context, violations, requests)
                yield request

        async def check(request_or_iterator, context):
            """The request, checked; or the stream of requests, to be checked one by one."""
            if streaming_requests:
                return checked(request_or_iterator, context)
            if violations := field_violations(request_or_iterator):
                await self._refuse(context, violations)
            return request_or_iterator

        def wrap(behaviour, response_streaming: bool):
            async def unary(request_or_iterator, context):
                return await behaviour(await check(request_or_iterator, context), context)

            async def stream(request_or_iterator, context):
                requests = await check(request_or_iterator, context)
                async with contextlib.aclosing(behaviour(requests, context)) as replies:
                    async for reply in replies:
                        yield reply

            return stream if response_streaming else unary

        return wrap_handler(handler, wrap)
