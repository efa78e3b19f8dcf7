"""API stages: throughput against the ideal (``max_in_flight / latency``) and against the
``asyncio.gather`` loop a user writes by hand, with the CPU each request costs.

    python bench/api.py [--latency 0.1,0.5] [--in-flight 16,64] [--windows 20] [--jitter 0.2]

The OpenAI-compatible test server (``longrun_dagster.llm_server``) runs in a process of
its own with the given latency (each request ``latency * (1 + jitter * u)``, u uniform
in -1..1). For each (latency, max_in_flight), with ``windows * max_in_flight`` rows:

- **stage**: an ``api_stage`` (chat, a pydantic response model, pandera schema, answers
  journal, checkpoints, quarantine) through ``dg.materialize`` on a local store, timed as
  a user meets it: from the server's first request to the asset check's verdict event;
- **gather**: a hand-written loop over ``AsyncOpenAI`` in batches of ``max_in_flight``
  (``asyncio.gather``, then pydantic validation and a DataFrame at the end), no retries,
  no checkpoints, timed from its first request to its frame.

Reported: rows/s of each, the stage over the ideal and over the gather loop (same run),
and CPU milliseconds per request in this process (the server's CPU is its own).
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pydantic

sys.path.insert(0, str(Path(__file__).parent.parent))

from longrun_dagster import Answer, ApiEndpoint, AtomicObjectStoreIOManager, api_stage  # noqa: E402


class Extraction(pydantic.BaseModel):
    summary: str
    n_words: int
    label: str


class Extracted(pa.DataFrameModel):
    id: str
    summary: str
    n_words: int = pa.Field(ge=1)
    label: str = pa.Field(isin=["short", "long"])


INSTANCE = dg.DagsterInstance.ephemeral()


def texts(n: int) -> list[str]:
    words = "red green blue cyan magenta yellow black white".split()
    return [f"row {i}: " + " ".join(words[(i + k) % 8] for k in range(4 + i % 10))
            for i in range(n)]


def ask(row: dict[str, Any], stage: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": row["text"]}]}


def parse(answer: Answer, row: dict[str, Any], stage: Any) -> dict[str, Any]:
    return {"id": row["id"], **answer.parsed.model_dump()}


def start_server(latency: float, jitter: float) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "longrun_dagster.llm_server", "--port",
                             str(port), "--latency", str(latency), "--jitter", str(jitter)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, f"http://127.0.0.1:{port}/v1"


def server_log(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_log") as answer:
        log: list[dict[str, Any]] = json.loads(answer.read())
        return log


def reset(url: str) -> None:
    request = urllib.request.Request(url.removesuffix("/v1") + "/_reset", data=b"{}",
                                     method="POST")
    urllib.request.urlopen(request).read()


def run_stage(url: str, rows: int, in_flight: int) -> tuple[float, float]:
    """(seconds from the first request to the check's verdict, CPU seconds)."""

    @dg.asset
    def notes() -> pd.DataFrame:
        return pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": texts(rows)})

    stage = api_stage(upstream=notes, schema=Extracted, model="longrun-tiny", parse=parse,
                      response_model=Extraction, name="extracted", batch_size=64,
                      max_in_flight=in_flight)(ask)
    base = tempfile.mkdtemp(prefix="bench-api-")
    resources = {"io_manager": AtomicObjectStoreIOManager(base_uri=Path(base).as_uri()),
                 "llm": ApiEndpoint(base_url=url)}
    dg.materialize([notes], resources=resources)
    reset(url)
    cpu = time.process_time()
    result = dg.materialize([notes, stage], selection=[stage], resources=resources,
                            instance=INSTANCE)
    cpu = time.process_time() - cpu
    assert result.success
    first = min(r["started"] for r in server_log(url))
    verdict_at = next(e.timestamp for e in INSTANCE.all_logs(result.run_id)
                      if e.dagster_event is not None and
                      e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION")
    return verdict_at - first, cpu


async def gather_loop(url: str, rows: int, in_flight: int) -> tuple[float, float]:
    """What a user writes today: batches of ``in_flight`` requests, ``gather``ed."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": texts(rows)})
    out: list[dict[str, Any]] = []
    cpu, began = time.process_time(), time.time()
    for start in range(0, rows, in_flight):
        chunk = frame.iloc[start:start + in_flight]
        answers = await asyncio.gather(*[
            client.chat.completions.create(model="longrun-tiny", messages=[
                {"role": "user", "content": text}]) for text in chunk.text])
        for row_id, answer in zip(chunk.id, answers, strict=True):
            parsed = Extraction.model_validate_json(answer.choices[0].message.content or "")
            out.append({"id": row_id, **parsed.model_dump()})
    Extracted.validate(pd.DataFrame(out))
    wall, cpu = time.time() - began, time.process_time() - cpu
    await client.close()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", default="0.1,0.5")
    parser.add_argument("--in-flight", default="16,64")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--jitter", type=float, default=0.2)
    args = parser.parse_args()
    os.environ.setdefault("DAGSTER_HOME", tempfile.mkdtemp(prefix="bench-api-home-"))
    print(f"{'latency':>7} {'in_flight':>9} {'rows':>5} {'ideal/s':>8} {'stage/s':>8} "
          f"{'gather/s':>8} {'stage/ideal':>11} {'stage/gather':>12} {'cpu ms/req':>10} "
          f"{'gather cpu':>10}")
    for latency in [float(x) for x in args.latency.split(",")]:
        server, url = start_server(latency, args.jitter)
        try:
            asyncio.run(gather_loop(url, 32, 16))  # warm-up: imports, connections
            for in_flight in [int(x) for x in args.in_flight.split(",")]:
                rows = in_flight * args.windows
                stage_wall, stage_cpu = run_stage(url, rows, in_flight)
                gather_wall, gather_cpu = asyncio.run(gather_loop(url, rows, in_flight))
                ideal = in_flight / latency
                stage_rate, gather_rate = rows / stage_wall, rows / gather_wall
                print(f"{latency:>7.2f} {in_flight:>9} {rows:>5} {ideal:>8.1f} "
                      f"{stage_rate:>8.1f} {gather_rate:>8.1f} {stage_rate / ideal:>11.2f} "
                      f"{stage_rate / gather_rate:>12.2f} "
                      f"{1000 * stage_cpu / rows:>10.2f} {1000 * gather_cpu / rows:>10.2f}",
                      flush=True)
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
