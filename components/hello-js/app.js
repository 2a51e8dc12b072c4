// hello-js: the hello app written in JavaScript (componentize-js), a plain wasi:http handler.
// `GET /apps/hello-js/?name=edge` answers `Hello, edge!`.
//
// It exports `wasi:http/incoming-handler` itself rather than a `fetch` event listener:
// componentize-js's fetch-event dispatch cannot serve a second request in the same instance
// (StarlingMonkey issue 247), so an app written that way cannot be deployed with
// `requests_per_instance` above 1.
import {
  Fields,
  OutgoingBody,
  OutgoingResponse,
  ResponseOutparam,
} from "wasi:http/types@0.2.10";

const encoder = new TextEncoder();

export const incomingHandler = {
  handle(request, responseOut) {
    const pathWithQuery = request.pathWithQuery() ?? "/";
    request[Symbol.dispose]();
    const query = pathWithQuery.includes("?") ? pathWithQuery.slice(pathWithQuery.indexOf("?") + 1) : "";
    const name = new URLSearchParams(query).get("name") || "world";
    const response = new OutgoingResponse(
      Fields.fromList([["content-type", encoder.encode("text/plain; charset=utf-8")]]),
    );
    const body = response.body();
    ResponseOutparam.set(responseOut, { tag: "ok", val: response });
    const stream = body.write();
    stream.blockingWriteAndFlush(encoder.encode(`Hello, ${name}!\n`));
    stream[Symbol.dispose]();
    OutgoingBody.finish(body, undefined);
  },
};
