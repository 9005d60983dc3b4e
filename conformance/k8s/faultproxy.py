#!/usr/bin/env python3
"""A controllable TCP proxy for fault injection between a weft agent and the API server.

    faultproxy.py --listen 198.18.0.1:16443 --upstream 127.0.0.1:6443 --control DIR/proxy.sock

Plain TCP: TLS passes through untouched (the client still verifies the API server's cert,
so listen on an address in the serving cert's SANs). Python 3 standard library only.

Control: HTTP GET on the unix socket given by --control, e.g.
    curl -s --unix-socket DIR/proxy.sock http://proxy/cut
  /forward   (alias /resume) forward normally; connections frozen by /stall carry on
  /cut       close every open connection now (both sides); the mode does not change
  /block     refuse new connections (accept, then close at once) until /forward
  /stall     stop forwarding in both directions on every connection, open and new,
             without closing anything (a stalled stream), until /forward
  /stats     JSON: mode, open connections, accepted, cut, bytes each way
Every command answers with the /stats JSON after it took effect.
"""

import argparse
import json
import os
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

CHUNK = 65536
LIMIT = 1 << 20  # most bytes buffered towards one side before reading from the other stops


def log(msg):
    print(f"[faultproxy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hostport(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Conn:
    """One proxied connection: client socket <-> upstream socket, with pending bytes each way."""

    def __init__(self, client, upstream, peer):
        self.client, self.upstream, self.peer = client, upstream, peer
        self.out = {client: bytearray(), upstream: bytearray()}  # bytes waiting to go TO key
        self.closed = False

    def other(self, s):
        return self.upstream if s is self.client else self.client


class Proxy:
    def __init__(self, listen, upstream):
        self.upstream = upstream
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(listen)
        self.lsock.listen(128)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.lock = threading.Lock()
        self.mode = "forward"
        self.conns = []
        self.registered = {}  # socket -> events currently registered
        self.pending_cut = False
        self.stats = {"accepted": 0, "refused": 0, "cut": 0, "bytes_up": 0, "bytes_down": 0}

    # --- control (called from the control thread) -------------------------------------------
    def command(self, cmd):
        with self.lock:
            if cmd in ("forward", "resume"):
                self.mode = "forward"
            elif cmd in ("block", "stall"):
                self.mode = cmd
            elif cmd == "cut":
                self.pending_cut = True
            elif cmd != "stats":
                return None
        if cmd == "cut":  # wait (bounded) until the loop has done it, so the answer is true
            for _ in range(50):
                with self.lock:
                    if not self.pending_cut:
                        break
                time.sleep(0.02)
        if cmd != "stats":
            log(f"control: {cmd}")
        return self.snapshot()

    def snapshot(self):
        with self.lock:
            return dict(self.stats, mode=self.mode, open=len(self.conns))

    # --- event loop ---------------------------------------------------------------------------
    def close(self, c, why):
        if c.closed:
            return
        c.closed = True
        for s in (c.client, c.upstream):
            if s in self.registered:
                self.sel.unregister(s)
                del self.registered[s]
            try:
                s.close()
            except OSError:
                pass
        self.conns.remove(c)
        log(f"closed {c.peer}: {why}")

    def accept(self):
        try:
            client, peer = self.lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        peer = f"{peer[0]}:{peer[1]}"
        if self.mode == "block":
            self.stats["refused"] += 1
            client.close()
            log(f"refused {peer} (blocked)")
            return
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError as e:
            client.close()
            log(f"refused {peer}: upstream {e}")
            return
        for s in (client, up):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(client, up, peer)
        self.conns.append(c)
        self.stats["accepted"] += 1
        log(f"accepted {peer}{' (stalled)' if self.mode == 'stall' else ''}")

    def interests(self):
        stalled = self.mode == "stall"
        for c in list(self.conns):
            for s in (c.client, c.upstream):
                ev = 0
                if not stalled:
                    if len(c.out[c.other(s)]) < LIMIT:
                        ev |= selectors.EVENT_READ
                    if c.out[s]:
                        ev |= selectors.EVENT_WRITE
                have = self.registered.get(s, 0)
                if ev == have:
                    continue
                if have and ev:
                    self.sel.modify(s, ev, c)
                elif have:
                    self.sel.unregister(s)
                else:
                    self.sel.register(s, ev, c)
                if ev:
                    self.registered[s] = ev
                else:
                    self.registered.pop(s, None)

    def pump(self, c, s, mask):
        if c.closed:
            return
        if mask & selectors.EVENT_READ:
            try:
                data = s.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                return self.close(c, f"read error {e}")
            if data == b"":
                return self.close(c, "eof from " + ("client" if s is c.client else "upstream"))
            if data:
                c.out[c.other(s)] += data
                self.stats["bytes_up" if s is c.client else "bytes_down"] += len(data)
        if mask & selectors.EVENT_WRITE and c.out[s]:
            try:
                n = s.send(c.out[s])
                del c.out[s][:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                return self.close(c, f"write error {e}")

    def run(self):
        log(f"listening on {self.lsock.getsockname()}, upstream {self.upstream}")
        while True:
            with self.lock:
                if self.pending_cut:
                    n = len(self.conns)
                    for c in list(self.conns):
                        self.close(c, "cut by control")
                    self.stats["cut"] += n
                    self.pending_cut = False
                self.interests()
            for key, mask in self.sel.select(timeout=0.05):
                with self.lock:
                    if key.data is None:
                        self.accept()
                    elif self.mode != "stall":
                        self.pump(key.data, key.fileobj, mask)


def control_server(path, proxy):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            out = proxy.command(self.path.strip("/").split("?")[0])
            body = (json.dumps(out) if out is not None else '{"error":"unknown command"}') + "\n"
            self.send_response(200 if out is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

        def address_string(self):
            return "control"

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    if os.path.exists(path):
        os.unlink(path)
    srv = Server(path, Handler)
    os.chmod(path, 0o600)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    ap.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--control", required=True, help="unix socket path for control commands")
    a = ap.parse_args()
    proxy = Proxy(hostport(a.listen), hostport(a.upstream))
    control_server(a.control, proxy)
    signal.signal(signal.SIGTERM, lambda *_: (os.path.exists(a.control) and os.unlink(a.control), os._exit(0)))
    try:
        proxy.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
