"""A gRPC server (the real grpcio library) for the gateway's tests to proxy to.

Usage: server.py CALLS_FILE [CERT KEY]
Serves test.Echo on 127.0.0.1 (with TLS when CERT and KEY are given), prints its port,
and appends one line per call to CALLS_FILE: the method, then the identity and
credential metadata it was sent, as JSON. Methods (raw bytes in and out):
  Unary         the request reversed; trailing metadata x-echo-trailer: done
  ServerStream  three messages: the request followed by 0, 1, 2
  ClientStream  every message joined
  Bidi          every message upper-cased, as it arrives
  Fail          aborts with ABORTED "upstream says no" and trailing metadata
  Slow          answers after 3 seconds
"""
import json
import sys
import time
from concurrent import futures

import grpc


def main():
    calls = sys.argv[1]

    def record(method, ctx):
        md = dict(ctx.invocation_metadata())
        seen = {k: md.get(k) for k in ("x-gatehouse-user", "x-api-key", "authorization", "x-forwarded-for")}
        with open(calls, "a") as f:
            f.write(json.dumps({"method": method, "metadata": seen}) + "\n")

    def unary(req, ctx):
        record("Unary", ctx)
        ctx.set_trailing_metadata((("x-echo-trailer", "done"),))
        return req[::-1]

    def server_stream(req, ctx):
        record("ServerStream", ctx)
        for i in range(3):
            yield req + bytes([48 + i])

    def client_stream(it, ctx):
        record("ClientStream", ctx)
        return b"".join(it)

    def bidi(it, ctx):
        record("Bidi", ctx)
        for m in it:
            yield m.upper()

    def fail(req, ctx):
        record("Fail", ctx)
        ctx.set_trailing_metadata((("x-why", "on-purpose"),))
        ctx.abort(grpc.StatusCode.ABORTED, "upstream says no")

    def slow(req, ctx):
        record("Slow", ctx)
        time.sleep(3)
        return req

    handlers = {
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    if len(sys.argv) > 3:
        with open(sys.argv[2], "rb") as c, open(sys.argv[3], "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
