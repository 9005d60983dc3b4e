#!/usr/bin/env python3
"""Times one API write until every weft agent reports it applied in its kernel.

    timedwrite.py --server https://127.0.0.1:6443 --ca CA --cert CRT --key KEY \\
        --kind pods --method PATCH --path /api/v1/namespaces/a/pods/p --body '{"metadata":...}' \\
        --agent node1=DIR/agent1.sock --agent node2=DIR/agent2.sock [--timeout 60]

Prints one JSON line: {"rv": "123", "answered_ms": 4.1, "applied_ms": {"node1": 31.2, ...}}
(applied_ms null: not within the timeout). The clock starts just before the request is sent
(connection already open); each agent's /debug/state (unix socket) is polled every millisecond
until `kinds.<kind>.applied_resource_version` >= the write's resourceVersion. PATCH is a merge
patch. A DELETE answers with a Status that has no resourceVersion: the deletion's is read from a
watch started at the object's last resourceVersion. Python 3 standard library only.
"""

import argparse
import http.client
import json
import socket
import ssl
import sys
import time
from urllib.parse import urlparse


def debug_state(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        s.sendall(b"GET /debug/state HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def applied(path, kind):
    try:
        v = debug_state(path)["kinds"][kind]["applied_resource_version"]
        return int(v) if v else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--body", default="")
    ap.add_argument("--agent", action="append", default=[], help="NAME=SOCKET")
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()

    u = urlparse(a.server)
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.load_cert_chain(a.cert, a.key)

    def conn():
        c = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=20)
        c.connect()
        return c

    c = conn()
    r0 = None
    if a.method == "DELETE":
        c.request("GET", a.path)
        r0 = json.loads(c.getresponse().read())["metadata"]["resourceVersion"]
    headers = {"Content-Type": "application/merge-patch+json" if a.method == "PATCH" else "application/json"}
    t0 = time.monotonic()
    c.request(a.method, a.path, body=a.body.encode() or None, headers=headers)
    resp = c.getresponse()
    answer = json.loads(resp.read() or b"{}")
    t1 = time.monotonic()
    if resp.status >= 300:
        print(json.dumps({"error": f"{resp.status} {answer.get('message', '')}"}))
        return 1
    rv = answer.get("metadata", {}).get("resourceVersion")
    if a.method == "DELETE":
        coll, name = a.path.rsplit("/", 1)
        w = conn()
        w.request("GET", f"{coll}?watch=1&fieldSelector=metadata.name%3D{name}&resourceVersion={r0}")
        wr = w.getresponse()
        while True:
            line = wr.readline()
            if not line:
                break
            ev = json.loads(line)
            if ev.get("type") == "DELETED":
                rv = ev["object"]["metadata"]["resourceVersion"]
                break
        w.close()
    if not rv:
        print(json.dumps({"error": "no resourceVersion"}))
        return 1
    want = int(rv)
    agents = dict(x.split("=", 1) for x in a.agent)
    done = {}
    deadline = t0 + a.timeout
    while len(done) < len(agents) and time.monotonic() < deadline:
        for name, sock in agents.items():
            if name not in done and applied(sock, a.kind) >= want:
                done[name] = round((time.monotonic() - t0) * 1000, 1)
        time.sleep(0.001)
    print(json.dumps({
        "rv": rv,
        "answered_ms": round((t1 - t0) * 1000, 1),
        "applied_ms": {n: done.get(n) for n in agents},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
