"""A wasi:http function in Python, for wasmgate's tests: `?cache` counts calls in the `cache`
capability, `?spin` loops past its timeout, `?hog` allocates past its memory cap, `?trap`
raises; anything else answers a greeting with the path it was asked."""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports import cache
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


def answer(out: ResponseOutparam, status: int, text: str) -> None:
    headers = Fields.from_list([("content-type", b"text/plain; charset=utf-8"),
                                ("x-written-in", b"python")])
    response = OutgoingResponse(headers)
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(out, Ok(response))
    with body.write() as stream:
        stream.blocking_write_and_flush(text.encode())
    OutgoingBody.finish(body, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = request.path_with_query() or "/"
        query = path.partition("?")[2]
        if query == "cache":
            answer(response_out, 200, f"calls: {cache.increment('calls', 1)}\n")
        elif query == "spin":
            while True:
                pass
        elif query == "hog":
            hog = [bytearray(1024 * 1024) for _ in range(1024)]
            answer(response_out, 200, f"held {len(hog)} MiB\n")
        elif query == "trap":
            raise RuntimeError("asked to fail")
        else:
            answer(response_out, 200, f"hello from python at {path}\n")
