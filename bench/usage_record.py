"""What one usage record costs the worker that receives it (no Envoy, one process).

Envoy's OpenTelemetry access logger sends a record per proxied request, in batches, to the
workers (``envoy_config._usage_log``, ``server/usage_log.py``). This builds one batch of
``--records`` records as Envoy writes them for a pass-through chat request with usage, in
both layouts the worker reads:

- ``attributes``: one string attribute per field (configurations rendered before the body
  layout; 16 key-value messages per record);
- ``body``: one string, a line per field (``names.LOG_FIELDS``; what ``envoy_config``
  renders now);

and times ``UsageLog.export`` on it, with prometheus_client in multiprocess mode (a temporary
``PROMETHEUS_MULTIPROC_DIR``, as under ``plano-extproc up``), against the same batch with the
metrics written record by record (``Metrics.record`` per exchange, the way the worker wrote
them before ``Metrics.record_all``). Reported: CPU microseconds per record, the best of
``--repeats`` timings of ``--batches`` batches each (process time, so other load on the box
adds little).

    .venv/bin/python bench/usage_record.py [--records 300] [--batches 10] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Before prometheus_client is imported: it picks its value class (mmap files) at import.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="plano-usage-record-")

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as ls

from plano_extproc.metrics import Exchange, Metrics
from plano_extproc.names import LOG_FIELDS
from plano_extproc.server.usage_log import _GROUP_FIELD, UsageLog

MODEL = "openai/gpt-4o-mini"
# A record as Envoy's formatter writes it for a pass-through chat request ("-": not known).
RECORD = {
    "api": "chat_completions",
    "model": MODEL,
    "route": "-",
    "rq": "gpt-4o-mini",
    "pn": "-",
    "u": "-",
    "rl": "-",
    "usage": '{"prompt_tokens":12,"completion_tokens":9}',
    "status": "200",
    "attempts": "1",
    "duration_us": "1834",
    "duration_ms": "1",
    "body_us": "1500",
    "content_type": "application/json",
    "request_id": "6f1c2a9e-8b7d-4c3e-9f1a-2b3c4d5e6f70",
    "traceparent": "-",
}


def batch(records: int, layout: str) -> bytes:
    assert set(RECORD) == set(LOG_FIELDS)
    req = ls.ExportLogsServiceRequest()
    group = getattr(req.resource_logs.add(), _GROUP_FIELD).add()
    for _ in range(records):
        rec = group.logs.add()
        if layout == "body":
            rec.body.string_value = "\n".join(RECORD[k] for k in LOG_FIELDS)
        else:
            for key, value in RECORD.items():
                kv = rec.attributes.add()
                kv.key, kv.value.string_value = key, value
    return req.SerializeToString()


class OneByOne(Metrics):
    """The metrics written per record (the worker's way before ``record_all``)."""

    def record_all(self, exchanges: Iterable[Exchange]) -> None:
        for ex in exchanges:
            super().record_all((ex,))


def best(fn: Callable[[], object], batches: int, repeats: int) -> float:
    fn()  # children created, files mapped
    times = []
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(batches):
            fn()
        times.append(time.process_time() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=300, help="records per batch")
    ap.add_argument("--batches", type=int, default=10, help="batches per timing")
    ap.add_argument("--repeats", type=int, default=7, help="timings (the best is kept)")
    args = ap.parse_args(argv)
    print(f"| layout | metrics | µs per record ({args.records} records a batch) |")
    print("|---|---|---:|")
    for layout in ("attributes", "body"):
        raw = batch(args.records, layout)
        for name, cls in (("per record", OneByOne), ("per batch", Metrics)):
            usage = UsageLog(cls(models=[MODEL]))
            seconds = best(lambda u=usage, r=raw: u.export(r), args.batches, args.repeats)
            assert usage.records and not usage.malformed
            per = 1e6 * seconds / (args.batches * args.records)
            print(f"| {layout} | {name} | {per:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
