"""Processes for the eBPF root tests, run inside a pod's cgroup and network namespace with a
given UID (the pyenv python cannot run as UID 1337: the tests use /usr/bin/python3).

serve PORT...            listen on 0.0.0.0:PORT and [::]:PORT (v6-only); for each connection
                         write one line "PORT <listening port> ORIG <original dst or -> PEER
                         <peer>", then echo everything back. Prints "ready" once listening.
ask HOST PORT            connect, print the server's line.
loop HOST PORT N [SECS]  N connections one after another (or as many as fit in SECS when N is
                         0), each reading the line; prints "ok <n> fail <m> first <line>" and
                         the distinct failures.
echo HOST PORT BYTES     connect, send BYTES random bytes in chunks of varied sizes while
                         reading the echo back; prints "match <sha>" or "mismatch".
splice HOST PORT BYTES   the same, reading the echo with splice(2) through a pipe (as Go's
                         io.Copy between TCP connections does).
"""

import hashlib
import os
import socket
import struct
import sys
import threading
import time

SO_ORIGINAL_DST = 80
SOL_IPV6 = 41


def original_dst(conn):
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, addr = struct.unpack("!2xH4s8x", raw)
            return "%s:%d" % (socket.inet_ntop(socket.AF_INET, addr), port)
        raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack("!2xH4x16s4x", raw)
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, addr), port)
    except OSError:
        return "-"


def fmt(addr):
    return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % (addr[0], addr[1])


def handle(conn, port):
    try:
        line = "PORT %d ORIG %s PEER %s\n" % (port, original_dst(conn), fmt(conn.getpeername()))
        conn.sendall(line.encode())
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()


def accept_loop(listener, port):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, port), daemon=True).start()


def serve(ports):
    for port in ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(1024)
            threading.Thread(target=accept_loop, args=(s, port), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def connect(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((host, port))
    return s


def read_line(s):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise OSError("eof before the server's line: %r" % buf)
        buf += chunk
    return buf.decode().strip()


def ask(host, port):
    s = connect(host, port)
    print(read_line(s), flush=True)
    s.close()


def loop(host, port, n, secs):
    ok = fail = 0
    first = None
    errors = {}
    deadline = time.time() + secs if secs else None
    i = 0
    while (n and i < n) or (deadline and time.time() < deadline):
        i += 1
        try:
            s = connect(host, port)
            line = read_line(s)
            s.close()
            if first is None:
                first = line
            if line.split(" PEER ")[0] != first.split(" PEER ")[0]:
                raise OSError("different answer: %s" % line)
            ok += 1
        except OSError as e:
            fail += 1
            errors[str(e)] = errors.get(str(e), 0) + 1
    print("ok %d fail %d first %s" % (ok, fail, first), flush=True)
    for e, count in errors.items():
        print("error %d x %s" % (count, e), flush=True)


def echo(host, port, total, use_splice=False):
    s = connect(host, port)
    read_line(s)
    if use_splice:
        s.settimeout(None)  # splice(2) wants a blocking socket
    payload = os.urandom(total)
    sent_hash = hashlib.sha256(payload).hexdigest()
    received = bytearray()

    def reader():
        r, w = os.pipe()
        while len(received) < total:
            if use_splice:
                n = os.splice(s.fileno(), w, 65536)
                data = os.read(r, n) if n else b""
            else:
                data = s.recv(65536)
            if not data:
                break
            received.extend(data)

    t = threading.Thread(target=reader)
    t.start()
    sizes = [1, 7, 1000, 4096, 65536, 100000, 13]
    off = i = 0
    while off < total:
        n = sizes[i % len(sizes)]
        s.sendall(payload[off:off + n])
        off += n
        i += 1
    t.join(30)
    got = hashlib.sha256(bytes(received)).hexdigest()
    print(("match %s" if got == sent_hash else "mismatch %s") % got, flush=True)
    s.close()


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve([int(p) for p in args])
    elif cmd == "ask":
        ask(args[0], int(args[1]))
    elif cmd == "loop":
        loop(args[0], int(args[1]), int(args[2]), float(args[3]) if len(args) > 3 else 0)
    elif cmd == "echo":
        echo(args[0], int(args[1]), int(args[2]))
    elif cmd == "splice":
        echo(args[0], int(args[1]), int(args[2]), use_splice=True)
    else:
        sys.exit("unknown command " + cmd)


main()
