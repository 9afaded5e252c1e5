"""An ext_proc worker that does no work per request: the floor under our own CPU.

Run like ``python -m plano_extproc`` (same arguments). The first ``/v1/chat/completions``
stream is served by the real stream logic; its replies (request headers, request body) are
kept and every later stream of that path gets them again without parsing, routing or
building anything. With a load that sends one identical request (bench/extproc_floor.py)
the replies are the ones the real logic would have built, so Envoy does exactly what it
does for the real gateway, and the worker's CPU is only its transport: HTTP/2 frames,
protobuf decode of Envoy's messages, the usage records. A measuring instrument for
bench/extproc_floor.py, never a server to deploy.
"""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from plano_extproc.cli import main
from plano_extproc.server import servicer

_real_step = servicer.ExtProcStream.step
_kept: dict[str, servicer.Reply] = {}


def _replaying_step(
    self: servicer.ExtProcStream, req: pb.ProcessingRequest
) -> servicer.Reply | Coroutine[Any, Any, servicer.Reply]:
    which = req.WhichOneof("request") or ""
    kept = _kept.get(which)
    if kept is not None:
        return kept
    out = _real_step(self, req)
    info = self.info
    keep = info is not None and info.path == "/v1/chat/completions"
    if isinstance(out, servicer.Reply):
        if keep and not (which == "request_headers" and out.last):  # not an early error
            _kept[which] = out
        return out

    async def kept_when_done() -> servicer.Reply:
        reply = await out
        if keep:
            _kept[which] = reply
        return reply

    return kept_when_done()


servicer.ExtProcStream.step = _replaying_step  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
