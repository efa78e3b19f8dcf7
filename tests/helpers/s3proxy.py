"""A fault-injecting HTTP proxy on loopback in front of the S3 endpoint.

Rules match requests (method, path substring, query substring) and inject a fault: an
HTTP error (500, 503 SlowDown), a connection reset before or after forwarding, or a
delay. Everything else is forwarded unchanged, so boto3 talks real HTTP to real S3
semantics (moto) through real failures.
"""

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERRORS = {
    500: b"<Error><Code>InternalError</Code><Message>injected</Message></Error>",
    503: b"<Error><Code>SlowDown</Code><Message>injected throttle</Message></Error>",
}


@dataclass
class Rule:
    fault: str  # "500", "503", "reset-before", "reset-after", "delay"
    method: str = ""
    path: str = ""
    query: str = ""
    times: int = 1_000_000  # how many matching requests get the fault
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        path, _, query = target.partition("?")
        return (not self.method or method == self.method) and self.path in path and \
            self.query in query and self.hits < self.times


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, target, outcome)

    def start(self) -> str:
        proxy = self
        up = urlparse(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length) if length else b""
                rule = next((r for r in proxy.rules if r.matches(self.command, self.path)),
                            None)
                if rule is not None:
                    rule.hits += 1
                outcome = rule.fault if rule else "ok"
                proxy.log.append((self.command, self.path, outcome))
                if rule and rule.fault == "delay":
                    time.sleep(rule.delay)
                if rule and rule.fault in ("500", "503"):
                    self._error(int(rule.fault))
                    return
                if rule and rule.fault == "reset-before":
                    self._reset()
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{up.hostname}:{up.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if rule and rule.fault == "reset-after":  # done upstream, answer lost
                    self._reset()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but the object's length (S3 stat reads it).
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" \
                    else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int) -> None:
                payload = ERRORS[status]
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
