"""Runs every kind of gRPC call through Gatehouse with the real grpcio client library.

Usage: flows.py TARGET API_KEY
Calls test.Echo (see server.py) on an insecure HTTP/2 channel to the gateway, with the
key in metadata, and prints one JSON object: what each call returned, its status, and
its trailing metadata.
"""
import json
import sys

import grpc


def status(e):
    return {"code": e.code().name, "details": e.details(), "trailers": dict(e.trailing_metadata() or ())}


def main():
    target, key = sys.argv[1], sys.argv[2]
    md = (("x-api-key", key),)
    out = {}
    with grpc.insecure_channel(target) as ch:
        unary = ch.unary_unary("/test.Echo/Unary", request_serializer=None, response_deserializer=None)
        resp, call = unary.with_call(b"hello", metadata=md, timeout=10)
        out["unary"] = {"reply": resp.decode(), "code": call.code().name, "trailers": dict(call.trailing_metadata())}

        stream = ch.unary_stream("/test.Echo/ServerStream", request_serializer=None, response_deserializer=None)
        out["server_stream"] = [m.decode() for m in stream(b"s", metadata=md, timeout=10)]

        client = ch.stream_unary("/test.Echo/ClientStream", request_serializer=None, response_deserializer=None)
        out["client_stream"] = client(iter([b"a", b"b", b"c"]), metadata=md, timeout=10).decode()

        # Bidirectional: each reply is read before the next message is sent, so the
        # messages cross the gateway one at a time in both directions.
        bidi = ch.stream_stream("/test.Echo/Bidi", request_serializer=None, response_deserializer=None)
        import queue
        q = queue.Queue()

        def requests():
            while True:
                m = q.get()
                if m is None:
                    return
                yield m

        replies = bidi(requests(), metadata=md, timeout=10)
        got = []
        for word in [b"one", b"two", b"three"]:
            q.put(word)
            got.append(next(replies).decode())
        q.put(None)
        out["bidi"] = got + [m.decode() for m in replies]

        fail = ch.unary_unary("/test.Echo/Fail", request_serializer=None, response_deserializer=None)
        try:
            fail(b"x", metadata=md, timeout=10)
            out["fail"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["fail"] = status(e)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
