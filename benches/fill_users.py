#!/usr/bin/env python3
"""fill_users.py CREDS N [KEYMAP TOKEN USER]

Adds N filler API users (api_key, role `bench`, one key each, the shape the CLI writes) to a
credentials file the CLI created, so that a benchmark's snapshot holds as many users as the
nginx peers' key maps. Their tokens are random and held by nobody. With KEYMAP, also writes
an nginx `map` body of N + 1 entries: TOKEN -> USER first, then the fillers' tokens.
"""
import hashlib
import os
import sys

path, n = sys.argv[1], int(sys.argv[2])
keymap = sys.argv[3:6]
rows, entries = [], []
if keymap:
    entries.append(f'"{keymap[1]}" "{keymap[2]}";\n')
for i in range(n):
    token = "ghk_" + os.urandom(24).hex()
    entries.append(f'"{token}" "filler-{i:06d}";\n')
    rows.append(
        f"- id: filler-{i:06d}\n  status: active\n  auth_method: api_key\n  roles: [bench]\n"
        f"  created_at: 2026-01-01T00:00:00Z\n  updated_at: 2026-01-01T00:00:00Z\n"
        f"  keys:\n  - id: ak_filler{i:06d}\n    created_at: 2026-01-01T00:00:00Z\n"
        f"    token_sha256: {hashlib.sha256(token.encode()).hexdigest()}\n    hint: ghk_…{i:04d}\n"
    )
text = open(path).read()
assert "users:\n" in text, "unexpected credentials layout"
with open(path + ".tmp", "w") as f:
    f.write(text.replace("users:\n", "users:\n" + "".join(rows), 1))
os.replace(path + ".tmp", path)
if keymap:
    with open(keymap[0], "w") as f:
        f.write("".join(entries))
