"""A production-shaped Dagster deployment as processes: deploy/dagster.yaml on PostgreSQL,
`dagster-webserver` on a loopback port and `dagster-daemon run`, both loading the repo's
workspace.yaml; the test talks to it the way the UI does, GraphQL over HTTP.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent.parent
BIN = Path(sys.executable).parent


class GraphQLError(AssertionError):
    """The webserver answered a GraphQL request with errors (or not at all)."""


class Services:
    """DAGSTER_HOME with deploy/dagster.yaml, a webserver and a daemon; `env` is theirs."""

    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "deploy" / "dagster.yaml", self.home / "dagster.yaml")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **env, "DAGSTER_HOME": str(home)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.home / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def start_webserver(self) -> None:
        self.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1",
                                 "-p", str(self.port), "-w", "workspace.yaml"])

    def start_daemon(self) -> None:
        """`dagster-daemon run`, with backfill iterations 2 s apart instead of 30 (see
        tests/helpers/daemon.py)."""
        self.start("daemon", [sys.executable, "-m", "tests.helpers.daemon", "run",
                              "-w", "workspace.yaml"])

    def stop(self) -> None:
        """SIGTERM each process group, then SIGKILL what is left of it: the code servers
        and run workers they started outlive their parent otherwise."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        self.procs.clear()

    def keep_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("webserver", "daemon"):
            if (self.home / f"{name}.log").exists():
                shutil.copy(self.home / f"{name}.log", folder / f"{name}.log")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.home / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return path.read_text(errors="replace")[-chars:]

    def logs(self) -> str:
        return "\n".join(f"--- {name} log tail ---\n{self.log_tail(name)}"
                         for name in ("webserver", "daemon"))

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def graphql(self, query: str, variables: dict[str, Any] | None = None,
                timeout: float = 60.0) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError) as exc:
            self.check_alive()
            raise GraphQLError(f"GraphQL request failed: {exc!r}\n{self.logs()}") from exc
        if answer.get("errors"):
            raise GraphQLError(f"GraphQL errors: {json.dumps(answer['errors'])[:3000]}")
        data: dict[str, Any] = answer["data"]
        return data

    def wait_until(self, probe: Any, timeout: float, what: str, every: float = 1.0) -> Any:
        """Poll `probe()` until it returns something truthy; on timeout, say what we saw."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = probe()
            except (GraphQLError, OSError) as exc:  # the server may still be starting
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                             f"last answer: {last!r}"[:3000] + f"\n{self.logs()}")
