#!/usr/bin/env python3
"""A minimal Gatehouse HMAC client: the signing scheme integrators already use.

    signature = hmac.new(secret, f"{timestamp}{method.upper()}{path}{body}".encode("utf-8"),
                         hashlib.sha256).hexdigest()

where path is the request target exactly as sent (path plus ?query) and body the raw body.

Usage (against `cargo run --release -- demo`):
    python3 examples/hmac_client.py --url http://127.0.0.1:8080/api/v1/orders \
        --key-id hk_... --secret ghs_... --method POST --body '{"order":42}'
"""
import argparse
import hashlib
import hmac
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def sign(secret: str, timestamp: str, method: str, path: str, body: str) -> str:
    message = f"{timestamp}{method.upper()}{path}{body}".encode("utf-8")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--key-id", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--method", default="GET")
    p.add_argument("--body", default="")
    a = p.parse_args()

    u = urllib.parse.urlsplit(a.url)
    target = u.path or "/"
    if u.query:
        target += "?" + u.query
    ts = str(int(time.time()))
    headers = {
        "X-API-Key": a.key_id,
        "X-Timestamp": ts,
        "X-Signature": sign(a.secret, ts, a.method, target, a.body),
    }
    data = a.body.encode("utf-8") if a.body else None
    if data:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(a.url, data=data, headers=headers, method=a.method.upper())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            print(r.status, r.read().decode("utf-8", "replace"))
            return 0
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode("utf-8", "replace"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
