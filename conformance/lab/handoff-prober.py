#!/usr/bin/env python3
"""The continuous prober of conformance/lab/handoff-test.sh (issue 8), Python 3 stdlib only.

  serve PORT...                    echo server on every PORT (IPv4+IPv6), one thread per connection
  probe --out F --until T CELL...  from this network namespace, for every CELL
                                   "name=ip:port:long" (long=1: also keep one long-lived connection)
                                   a new TCP connection (new source port) every --interval
                                   seconds; connected within --timeout = ok. Writes one line per probe
                                   "P t0 t1 cell ok reason" and per long-lived event "L t cell event reason".
  judge --logs DIR --from T0 --to T1 --expect TABLE [--after TABLE --changed-from TA --changed-to TB]
                                   [--unscored CELL,...]
                                   scores every probe that started in [T0, T1) against TABLE (the
                                   demo's truth-table format); with --after, a probe of a cell whose
                                   truth differs between the tables is judged by TABLE if it started
                                   before TA, by the --after table if it started at or after TB, and
                                   is transitional (printed, not scored) in between. Every long-lived
                                   break in [T0, T1) is wrong. Prints "sent=N wrong=M transitional=K
                                   breaks=B" last, and each wrong result before it.

Every loop is bounded by --until (epoch seconds).
"""
import argparse
import glob
import os
import selectors
import socket
import sys
import threading
import time


def serve(ports):
    def handle(conn):
        try:
            conn.settimeout(600)
            while True:
                b = conn.recv(4096)
                if not b:
                    break
                conn.sendall(b)
        except OSError:
            pass
        finally:
            conn.close()

    def listen(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(512)
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threads = [threading.Thread(target=listen, args=(int(p),), daemon=True) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Out:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def line(self, *fields):
        with self.lock:
            self.f.write(" ".join(str(x) for x in fields) + "\n")


def family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def long_lived(out, name, ip, port, until):
    """One connection that sends a byte every 100 ms and expects it echoed within 1 s."""
    while time.time() < until:
        s = socket.socket(family(ip), socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect((ip, port))
        except OSError as e:
            out.line("L", f"{time.time():.3f}", name, "connect-failed", type(e).__name__)
            s.close()
            time.sleep(0.5)
            continue
        out.line("L", f"{time.time():.3f}", name, "up", "-")
        reason = None
        n = 0
        while time.time() < until:
            try:
                s.sendall(bytes([n % 256]))
                b = s.recv(1)
                if not b:
                    reason = "eof"
                elif b[0] != n % 256:
                    reason = "garbled"
            except socket.timeout:
                reason = "no-echo-within-1s"
            except OSError as e:
                reason = type(e).__name__
            if reason:
                break
            n += 1
            time.sleep(0.1)
        s.close()
        if reason:
            out.line("L", f"{time.time():.3f}", name, "break", reason)
            time.sleep(0.2)
        else:
            out.line("L", f"{time.time():.3f}", name, "end", n)


def probe(args):
    out = Out(args.out)
    cells = []
    for c in args.cells:
        name, rest = c.split("=", 1)
        ip, port, longl = rest.rsplit(":", 2)
        cells.append((name, ip.strip("[]"), int(port)))
        if longl == "1":
            threading.Thread(target=long_lived, args=(out, name, ip.strip("[]"), int(port), args.until),
                             daemon=True).start()
    sel = selectors.DefaultSelector()
    start = time.time()
    # Spread the cells over the interval so the probes are not synchronised.
    nxt = {i: start + args.interval * i / len(cells) for i in range(len(cells))}
    pending = {}  # socket -> (cell index, t0)
    while time.time() < args.until:
        now = time.time()
        for i, t in nxt.items():
            if t <= now:
                name, ip, port = cells[i]
                s = socket.socket(family(ip), socket.SOCK_STREAM)
                s.setblocking(False)
                t0 = time.time()
                try:
                    s.connect_ex((ip, port))
                    sel.register(s, selectors.EVENT_WRITE)
                    pending[s] = (i, t0)
                except OSError as e:
                    out.line("P", f"{t0:.3f}", f"{time.time():.3f}", name, 0, type(e).__name__)
                    s.close()
                nxt[i] = t + args.interval
                if nxt[i] < now:
                    nxt[i] = now + args.interval
        for key, _ in sel.select(timeout=0.02):
            s = key.fileobj
            i, t0 = pending.pop(s)
            sel.unregister(s)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            t1 = time.time()
            ok = 1 if err == 0 and t1 - t0 <= args.timeout else 0
            reason = "-" if err == 0 else os.strerror(err).replace(" ", "_")
            if err == 0 and not ok:
                reason = "slow"
            out.line("P", f"{t0:.3f}", f"{t1:.3f}", cells[i][0], ok, reason)
            s.close()
        now = time.time()
        for s, (i, t0) in list(pending.items()):
            if now - t0 > args.timeout:
                sel.unregister(s)
                del pending[s]
                out.line("P", f"{t0:.3f}", f"{now:.3f}", cells[i][0], 0, "timeout")
                s.close()


def read_table(path):
    """The demo's truth table -> {cell name: allowed?}; cell name "src>dst:port/via"."""
    truth = {}
    port = via = None
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("TCP "):
            w = line.split()
            port, via = w[1], w[3]
            continue
        w = line.split()
        if not w:
            continue
        if all(x.isdigit() for x in w):
            continue
        rows_keys = truth.setdefault("__keys__", [])
        src, marks, _idx = w[0], w[1:-1], w[-1]
        if src not in rows_keys:
            rows_keys.append(src)
        truth.setdefault("__rows__", {}).setdefault((port, via), []).append((src, marks))
    keys = truth.pop("__keys__")
    out = {}
    for (port, via), rows in truth.pop("__rows__").items():
        for src, marks in rows:
            for j, m in enumerate(marks):
                if m == "-":
                    continue
                out[f"{src}>{keys[j]}:{port}/{via}"] = m == "."
    return out


def stamp(t):
    return time.strftime("%T", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def judge(args):
    before = read_table(args.expect)
    after = read_table(args.after) if args.after else before
    changed = {c for c in before if before[c] != after.get(c)}
    unscored = set(filter(None, (args.unscored or "").split(",")))
    sent = wrong = trans = breaks = 0
    wrongs = []
    for path in sorted(glob.glob(os.path.join(args.logs, "*.log"))):
        for line in open(path):
            w = line.split()
            if w[0] == "P":
                t0, t1, cell, ok = float(w[1]), float(w[2]), w[3], w[4] == "1"
                if not (args.t_from <= t0 < args.t_to):
                    continue
                sent += 1
                if cell in unscored:
                    trans += 1
                    continue
                if cell in changed:
                    if t0 < args.changed_from:
                        want = before[cell]
                    elif t0 >= args.changed_to:
                        want = after[cell]
                    else:
                        trans += 1
                        continue
                else:
                    want = before[cell]
                if ok != want:
                    wrong += 1
                    wrongs.append(f"  WRONG {stamp(t0)} {cell}: {'allowed' if want else 'denied'} probe "
                                  + ("failed (" + w[5] + ")" if want else "succeeded"))
            elif w[0] == "L" and w[3] == "break":
                t = float(w[1])
                if args.t_from <= t < args.t_to and w[2] not in unscored:
                    breaks += 1
                    wrongs.append(f"  WRONG {stamp(t)} {w[2]}: long-lived connection broken ({w[4]})")
    for x in sorted(wrongs)[:50]:
        print(x)
    if len(wrongs) > 50:
        print(f"  ... {len(wrongs) - 50} more")
    print(f"sent={sent} wrong={wrong + breaks} transitional={trans} breaks={breaks}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("ports", nargs="+")
    p = sub.add_parser("probe")
    p.add_argument("--out", required=True)
    p.add_argument("--until", type=float, required=True)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("cells", nargs="+")
    j = sub.add_parser("judge")
    j.add_argument("--logs", required=True)
    j.add_argument("--from", dest="t_from", type=float, required=True)
    j.add_argument("--to", dest="t_to", type=float, required=True)
    j.add_argument("--expect", required=True)
    j.add_argument("--after")
    j.add_argument("--changed-from", type=float, default=float("inf"))
    j.add_argument("--changed-to", type=float, default=float("inf"))
    j.add_argument("--unscored")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.ports)
    elif a.cmd == "probe":
        probe(a)
    else:
        judge(a)


if __name__ == "__main__":
    sys.exit(main())
