"""Calls a gRPC method through Gatehouse with the real grpcio client library.

Usage: call.py TARGET METHOD [--meta KEY=VALUE ...] [--times N]
Sends N unary calls of METHOD (raw bytes in, raw bytes out: no generated code needed)
on one insecure HTTP/2 channel, and prints one JSON line per call: the status code's
name, its details, and the x-request-id the gateway returned in the trailing metadata.
"""
import argparse
import json

import grpc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("method")
    p.add_argument("--meta", action="append", default=[])
    p.add_argument("--times", type=int, default=1)
    a = p.parse_args()
    metadata = [tuple(m.split("=", 1)) for m in a.meta]
    with grpc.insecure_channel(a.target) as channel:
        call = channel.unary_unary(a.method, request_serializer=None, response_deserializer=None)
        for _ in range(a.times):
            try:
                _, c = call.with_call(b"\x00ping", metadata=metadata, timeout=10)
                code, details, trailing = c.code(), c.details(), c.trailing_metadata()
            except grpc.RpcError as e:
                code, details, trailing = e.code(), e.details(), e.trailing_metadata()
            ids = [v for k, v in (trailing or ()) if k == "x-request-id"]
            print(json.dumps({"code": code.name, "details": details, "request_id": ids[0] if ids else None}), flush=True)


if __name__ == "__main__":
    main()
