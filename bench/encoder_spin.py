"""CPU per encode of the embedded router's encoder with onnxruntime's thread spinning on/off.

onnxruntime's intra-op pool threads spin-wait after each run by default. Between sparse
requests that spinning is pure CPU cost. This measures process CPU (all threads) per encode
and encode latency, spinning on vs off, at a sparse rate (one encode every ``--gap`` seconds)
and back to back, interleaved in one run.

    .venv/bin/python bench/encoder_spin.py [--sparse 20] [--gap 0.25] [--dense 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from plano_extproc.routing.embedding import Encoder

WORDS = (
    "please write a python function that parses a csv file of orders, groups them by "
    "customer, sums the totals, and prints the ten largest customers with their order "
    "counts and average order value, handling missing fields and malformed rows gracefully"
)


def measure(enc: Encoder, n: int, gap: float, tag: str) -> tuple[float, float]:
    """(CPU ms per encode, p50 latency ms) over ``n`` encodes of distinct 50-word prompts."""
    lat: list[float] = []
    cpu0 = time.process_time()
    for i in range(n):
        text = f"{WORDS} (request {tag}-{i})"  # distinct text: the cache never answers
        t = time.perf_counter()
        enc.encode(text)
        lat.append(time.perf_counter() - t)
        if gap:
            time.sleep(gap)  # the spinning threads burn CPU while we sleep; process_time sees it
    cpu = time.process_time() - cpu0
    return cpu / n * 1000, statistics.median(lat) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparse", type=int, default=20, help="encodes per sparse round")
    ap.add_argument("--gap", type=float, default=0.25, help="seconds between sparse encodes")
    ap.add_argument("--dense", type=int, default=200, help="encodes per back-to-back round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    encoders = {name: Encoder(spin=spin) for name, spin in (("spin on", True), ("spin off", False))}
    for enc in encoders.values():
        enc.load()
        enc.encode("warm up")
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for name, enc in encoders.items():
            rows.setdefault((name, "sparse"), []).append(
                measure(enc, args.sparse, args.gap, f"s{r}{name}")
            )
            rows.setdefault((name, "dense"), []).append(
                measure(enc, args.dense, 0.0, f"d{r}{name}")
            )
    print(
        f"50-word prompt; sparse = one encode every {args.gap}s; medians over {args.rounds} rounds"
    )
    for (name, kind), values in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cpu = statistics.median(v[0] for v in values)
        p50 = statistics.median(v[1] for v in values)
        print(f"  {kind:6s} {name:8s}  CPU {cpu:6.2f} ms/encode   p50 {p50:5.2f} ms")


if __name__ == "__main__":
    main()
