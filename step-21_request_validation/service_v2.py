"""greeter.v2.GreeterService: the v2 API in front of the same Greeter (service.py). Each
request, checked by its rules (validation.py), is translated into v1's terms, each reply
back: both versions greet, log and publish events the same way, and v1 stays exactly what
it was. (step 17's README, "Why v2 is a new package".)"""

from greeter.v1 import greeter_pb2 as v1
from greeter.v2 import greeter_pb2 as v2
from greeter.v2 import greeter_pb2_grpc as v2_grpc
from service import Greeter


def joined(person: v2.Person) -> str:
    """The name v1 greets: given and family name. Person's rules keep it within v1's."""
    return " ".join(part for part in (person.given_name, person.family_name) if part)


class GreeterV2(v2_grpc.GreeterServiceServicer):
    def __init__(self, greeter: Greeter):
        self.greeter = greeter

    async def SayHello(self, request, context):
        name = joined(request.person)
        reply = await self.greeter.SayHello(v1.HelloRequest(name=name), context)
        return v2.SayHelloResponse(message=reply.message)

    async def StreamGreetings(self, request, context):
        name = joined(request.person)
        v1_request = v1.HelloRequest(name=name, count=request.count)
        async for reply in self.greeter.StreamGreetings(v1_request, context):
            yield v2.StreamGreetingsResponse(message=reply.message)

    async def GreetMany(self, request_iterator, context):
        async def v1_requests():
            async for request in request_iterator:
                yield v1.HelloRequest(name=joined(request.person))

        reply = await self.greeter.GreetMany(v1_requests(), context)
        return v2.GreetManyResponse(message=reply.message)

    async def Chat(self, request_iterator, context):
        async def v1_requests():
            async for request in request_iterator:
                yield v1.HelloRequest(name=joined(request.person))

        async for reply in self.greeter.Chat(v1_requests(), context):
            yield v2.ChatResponse(message=reply.message)
