"""hello-py: the hello app written in Python (componentize-py), a plain wasi:http handler.

`GET /apps/hello-py/?name=edge` answers `Hello, edge!`.
"""

from urllib.parse import parse_qs, urlsplit

from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)
from componentize_py_types import Ok


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        with request:
            query = parse_qs(urlsplit(request.path_with_query() or "/").query)
        name = (query.get("name") or ["world"])[0] or "world"
        response = OutgoingResponse(
            Fields.from_list([("content-type", b"text/plain; charset=utf-8")])
        )
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:
            stream.blocking_write_and_flush(f"Hello, {name}!\n".encode())
        OutgoingBody.finish(body, None)
