#!/usr/bin/env python3
"""The continuous prober of conformance/lab/handoff-test.sh (issue 8), Python 3 stdlib only.

  serve PORT...                    echo server on every PORT (IPv4+IPv6), TCP (one thread per
                                   connection) and UDP (every datagram sent back to its source)
  probe --out F --until T CELL...  from this network namespace, for every CELL
                                   "name=ip:port:long" (long=1: also keep one long-lived connection)
                                   every --interval seconds: TCP, a new connection (new source port),
                                   connected within --timeout = ok; UDP (a name with "/udp/"), a new
                                   socket (new source port) sends a token, the token echoed within
                                   --timeout = ok. Writes one line per probe
                                   "P t0 t1 cell ok reason" and per long-lived event "L t cell event reason".
  judge --logs DIR --from T0 --to T1 --expect TABLE[,TABLE] [--truth CELL=0|1,...]
                                   [--after TABLE[,TABLE] --changed-from TA
                                   --changed-to TB] [--unscored CELL,...] [--unscored-pods POD,...
                                   --unscored-from TA --unscored-to TB]
                                   scores every probe that started in [T0, T1) against TABLE (the
                                   demo's truth-table format; several files are merged); a cell
                                   naming a pod of --unscored-pods is not scored (counted as
                                   transitional) if it started in [TA, TB) (breaks: happened in it);
                                   with --after, a probe of a cell whose
                                   truth differs between the tables is judged by TABLE if it started
                                   before TA, by the --after table if it started at or after TB, and
                                   is transitional (printed, not scored) in between. Every long-lived
                                   break in [T0, T1) is wrong. Prints "sent=N wrong=M transitional=K
                                   breaks=B" last, and each wrong result before it.
  recovery --logs DIR --pods POD,... --from TUP --to T1
                                   for the cells naming one of PODS: seconds from TUP until every
                                   cell's probes are right for good (the first right probe after its
                                   last wrong one, TCP and UDP, judged by --expect) and every
                                   long-lived connection is up again; prints "recovery=S".

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

    def udp(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        while True:
            try:
                b, peer = s.recvfrom(2048)
                s.sendto(b, peer)
            except OSError:
                pass

    threads = [threading.Thread(target=listen, args=(int(p),), daemon=True) for p in ports]
    threads += [threading.Thread(target=udp, args=(int(p),), daemon=True) for p in ports]
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
    specs = list(args.cells)
    if args.wait_file:
        # Cells known only later (a pod's address once its CNI ADD returned): poll for the file.
        while not os.path.exists(args.wait_file):
            if time.time() >= args.until:
                return
            time.sleep(0.001)
        specs += [x for x in open(args.wait_file).read().split() if x]
    for c in specs:
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
                udp = "/udp/" in name
                s = socket.socket(family(ip), socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
                s.setblocking(False)
                t0 = time.time()
                try:
                    if udp:
                        # connect() binds a new source port and reports ICMP errors on recv.
                        s.connect((ip, port))
                        token = f"{name} {t0:.6f}".encode()
                        s.send(token)
                        sel.register(s, selectors.EVENT_READ)
                        pending[s] = (i, t0, token)
                    else:
                        s.connect_ex((ip, port))
                        sel.register(s, selectors.EVENT_WRITE)
                        pending[s] = (i, t0, None)
                except OSError as e:
                    out.line("P", f"{t0:.3f}", f"{time.time():.3f}", name, 0, type(e).__name__)
                    s.close()
                nxt[i] = t + args.interval
                if nxt[i] < now:
                    nxt[i] = now + args.interval
        for key, _ in sel.select(timeout=0.02):
            s = key.fileobj
            i, t0, token = pending.pop(s)
            sel.unregister(s)
            if token is None:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            else:
                try:
                    err = 0 if s.recv(2048) == token else -1
                except OSError as e:
                    err = e.errno or -1
            t1 = time.time()
            ok = 1 if err == 0 and t1 - t0 <= args.timeout else 0
            reason = "-" if err == 0 else "garbled" if err == -1 else os.strerror(err).replace(" ", "_")
            if err == 0 and not ok:
                reason = "slow"
            out.line("P", f"{t0:.3f}", f"{t1:.3f}", cells[i][0], ok, reason)
            s.close()
        now = time.time()
        for s, (i, t0, _) in list(pending.items()):
            if now - t0 > args.timeout:
                sel.unregister(s)
                del pending[s]
                out.line("P", f"{t0:.3f}", f"{now:.3f}", cells[i][0], 0, "timeout")
                s.close()


def read_table(path):
    """The demo's truth table -> {cell name: allowed?}; cell name "src>dst:port/via" (TCP) or
    "src>dst:port/udp/via" (UDP tables). Lines starting with # are comments."""
    truth = {}
    port = via = None
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("#"):
            continue
        if line.startswith("TCP ") or line.startswith("UDP "):
            w = line.split()
            port, via = (w[1], w[3]) if w[0] == "TCP" else (w[1] + "/udp", w[3])
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


def read_tables(paths):
    """read_table over a comma-separated list of files, merged."""
    out = {}
    for path in filter(None, paths.split(",")):
        out.update(read_table(path))
    return out


def cell_pods(cell):
    """"src>dst:port/..." -> (src, dst)."""
    src, rest = cell.split(">", 1)
    return src, rest.split(":", 1)[0]


def read_logs(logs):
    for path in sorted(glob.glob(os.path.join(logs, "*.log"))):
        for line in open(path):
            w = line.split()
            if len(w) >= 5:
                yield w


def judge(args):
    extra = {c.split("=")[0]: c.split("=")[1] == "1" for c in filter(None, (args.truth or "").split(","))}
    before = {**read_tables(args.expect), **extra}
    after = {**read_tables(args.after), **extra} if args.after else before
    changed = {c for c in before if before[c] != after.get(c)}
    unscored = set(filter(None, (args.unscored or "").split(",")))
    upods = set(filter(None, (args.unscored_pods or "").split(",")))

    def pod_window(cell, t):
        return args.unscored_from <= t < args.unscored_to and bool(upods & set(cell_pods(cell)))

    sent = wrong = trans = breaks = 0
    wrongs = []
    for w in read_logs(args.logs):
        if w[0] == "P":
            t0, cell, ok = float(w[1]), w[3], w[4] == "1"
            if not (args.t_from <= t0 < args.t_to):
                continue
            sent += 1
            if cell in unscored or pod_window(cell, t0):
                trans += 1
                continue
            if cell not in before:
                trans += 1
                wrongs.append(f"  UNKNOWN {stamp(t0)} {cell}: no truth for this cell (not scored)")
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
            if args.t_from <= t < args.t_to and w[2] not in unscored and not pod_window(w[2], t):
                breaks += 1
                wrongs.append(f"  WRONG {stamp(t)} {w[2]}: long-lived connection broken ({w[4]})")
    for x in sorted(wrongs)[:50]:
        print(x)
    if len(wrongs) > 50:
        print(f"  ... {len(wrongs) - 50} more")
    print(f"sent={sent} wrong={wrong + breaks} transitional={trans} breaks={breaks}")


def recovery(args):
    """Seconds from --from until the cells of --pods are right for good (see the module doc)."""
    truth = read_tables(args.expect)
    pods = set(filter(None, args.pods.split(",")))
    last_wrong = {}  # cell -> t1 of its last wrong probe
    first_right_after = {}  # cell -> t0 of the first right probe after that
    long_state = {}  # cell -> (last event, its time)
    for w in sorted(read_logs(args.logs), key=lambda w: float(w[1])):
        cell = w[3] if w[0] == "P" else w[2]
        if not (pods & set(cell_pods(cell))):
            continue
        if w[0] == "P":
            t0, t1 = float(w[1]), float(w[2])
            if not (args.t_from <= t0 < args.t_to) or cell not in truth:
                continue
            if (w[4] == "1") != truth[cell]:
                last_wrong[cell] = t1
                first_right_after.pop(cell, None)
            elif cell not in first_right_after:
                first_right_after[cell] = t0
        elif w[0] == "L" and float(w[1]) < args.t_to:
            long_state[cell] = (w[3], float(w[1]))
    ends = []
    for cell, t in last_wrong.items():
        if cell not in first_right_after:
            print(f"  NOT RECOVERED {cell}: wrong at {stamp(t)}, no right probe after it")
            ends.append(float("inf"))
        else:
            ends.append(first_right_after[cell])
    for cell, (event, t) in long_state.items():
        if event != "up":
            print(f"  NOT RECOVERED {cell}: long-lived connection {event} at {stamp(t)}")
            ends.append(float("inf"))
        elif t >= args.t_from:
            ends.append(t)
    rec = max(ends, default=args.t_from) - args.t_from
    print(f"recovery={max(rec, 0):.2f} cells={len(last_wrong)} long={len(long_state)}")


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
    p.add_argument("--wait-file", help="wait until this file exists, then add its cells (whitespace-separated)")
    p.add_argument("cells", nargs="*")
    j = sub.add_parser("judge")
    j.add_argument("--logs", required=True)
    j.add_argument("--from", dest="t_from", type=float, required=True)
    j.add_argument("--to", dest="t_to", type=float, required=True)
    j.add_argument("--expect", required=True)
    j.add_argument("--after")
    j.add_argument("--changed-from", type=float, default=float("inf"))
    j.add_argument("--changed-to", type=float, default=float("inf"))
    j.add_argument("--unscored")
    j.add_argument("--unscored-pods")
    j.add_argument("--truth", help="more cells: CELL=1 (allowed) or CELL=0 (denied), comma-separated")
    j.add_argument("--unscored-from", type=float, default=float("inf"))
    j.add_argument("--unscored-to", type=float, default=float("inf"))
    r = sub.add_parser("recovery")
    r.add_argument("--logs", required=True)
    r.add_argument("--pods", required=True)
    r.add_argument("--from", dest="t_from", type=float, required=True)
    r.add_argument("--to", dest="t_to", type=float, required=True)
    r.add_argument("--expect", required=True)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.ports)
    elif a.cmd == "probe":
        probe(a)
    elif a.cmd == "recovery":
        recovery(a)
    else:
        judge(a)


if __name__ == "__main__":
    sys.exit(main())
