"""A counting HTTP(S) proxy in front of an S3-compatible store, for the
benchmarks: every request is forwarded unchanged (Host header included, so
SigV4 signatures still match) and logged as one line of the log file:
"<method> <operation> <request bytes> <response bytes> <status> <arrived>
<answered> <path>" (times in epoch seconds; readers use the first five).
Count with `s3_count_proxy.py count LOG FROM_LINE`.

Usage:
  s3_count_proxy.py serve LOG UPSTREAM_PORT HTTP_PORT [TLS_PORT CERT KEY]
  s3_count_proxy.py count LOG [FROM_LINE [TO_LINE]]   (JSON counts by method
                                                       and operation)
pgBackRest speaks S3 only over TLS: it goes to TLS_PORT (a self-signed
certificate; it is told not to verify it); walshipper to HTTP_PORT.

LATENCY_MS=n in the environment of `serve` delays every request by n ms
before it is forwarded (0 by default): a store one round trip away, as a
cloud store in the same region is (about 10 to 30 ms to the first byte)."""
import http.client
import http.server
import json
import socket
import socketserver
import ssl
import sys
import os
import threading
import time
from urllib.parse import parse_qs, urlsplit

LATENCY = float(os.environ.get("LATENCY_MS", "0") or 0) / 1000.0
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}


def operation(method, target):
    """An S3 operation's name from a request (what a bill would count)."""
    url = urlsplit(target)
    q = parse_qs(url.query, keep_blank_values=True)
    path = url.path.strip("/")
    is_bucket = "/" not in path  # path style: /bucket or /bucket/key
    if method == "GET" and is_bucket:
        return "ListObjects" if "list-type" in q or "prefix" in q or not q else "GetBucket?"
    if method == "POST" and "delete" in q:
        return "DeleteObjects"
    if method == "POST" and "uploads" in q:
        return "CreateMultipartUpload"
    if method == "POST" and "uploadId" in q:
        return "CompleteMultipartUpload"
    if method == "PUT" and "partNumber" in q:
        return "UploadPart"
    if method == "DELETE" and "uploadId" in q:
        return "AbortMultipartUpload"
    return {"GET": "GetObject", "PUT": "PutObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(
        method, method
    )


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream_port = 0
    log_file = None
    log_lock = threading.Lock()

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle
        # and delayed ACKs add 40 ms to many requests.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _upstream(self):
        if getattr(self, "_conn", None) is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
            self._conn.connect()
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._conn

    def _body(self):
        """The request body as sent (chunked bodies are passed on chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline()
                out += line
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        t = self.rfile.readline()
                        out += t
                        if t in (b"\r\n", b"\n", b""):
                            return bytes(out), True
                out += self.rfile.read(size + 2)
        n = int(self.headers.get("Content-Length", "0") or 0)
        return (self.rfile.read(n) if n else b""), False

    def _forward(self):
        arrived = time.time()
        body, chunked = self._body()
        if LATENCY > 0:
            time.sleep(LATENCY)
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        for attempt in (0, 1):
            conn = self._upstream()
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.endheaders(body if body else None)
                resp = conn.getresponse()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._conn = None
                if attempt:
                    raise
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        has_body = self.command != "HEAD" and resp.status not in (204, 304)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and k.lower() != "transfer-encoding":
                self.send_header(k, v)
        if has_body and length is None:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        if has_body:
            while True:
                data = resp.read(1 << 16)
                if not data:
                    break
                sent += len(data)
                if length is None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                else:
                    self.wfile.write(data)
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
        else:
            resp.read()
        self.wfile.flush()
        # Then, for tracing (readers take the first five fields): when the
        # request arrived and when its answer was sent (epoch seconds), and
        # the path.
        line = (
            f"{self.command} {operation(self.command, self.path)} {len(body)} {sent} {resp.status}"
            f" {arrived:.3f} {time.time():.3f} {urlsplit(self.path).path}\n"
        )
        with self.log_lock:
            self.log_file.write(line)
            self.log_file.flush()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that closed its connection mid-answer is not news.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def serve(log, upstream, http_port, tls_port=None, cert=None, key=None):
    Proxy.upstream_port = int(upstream)
    Proxy.log_file = open(log, "a", buffering=1)
    servers = [Server(("127.0.0.1", int(http_port)), Proxy)]
    if tls_port:
        s = Server(("127.0.0.1", int(tls_port)), Proxy)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
        servers.append(s)
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].serve_forever()


def count(log, start=0, stop=None):
    with open(log) as f:
        lines = f.read().splitlines()[int(start) : None if stop is None else int(stop)]
    out = {"requests": 0, "by_method": {}, "by_operation": {}, "bytes_up": 0, "bytes_down": 0, "errors": 0}
    for line in lines:
        method, op, up, down, status = line.split()[:5]
        out["requests"] += 1
        out["by_method"][method] = out["by_method"].get(method, 0) + 1
        out["by_operation"][op] = out["by_operation"].get(op, 0) + 1
        out["bytes_up"] += int(up)
        out["bytes_down"] += int(down)
        # 404 of a HEAD/GET is an answer ("not there"), not a failure.
        out["errors"] += int(status) >= 500
    return out


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:])
    elif sys.argv[1] == "count":
        print(json.dumps(count(*sys.argv[2:])))
    else:
        sys.exit(__doc__)
