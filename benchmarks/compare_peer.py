"""etrace against braintrace, side by side, from the two training benchmarks.

Reads `benchmarks/results/training.json` (from `training.py`) and
`benchmarks/results/peer_braintrace.json` (from `peer_braintrace.py`), matches
their rows by model, hidden size, batch, sequence length and algorithm, and prints
the time per training step, the compile time and the compiled temporary memory of
both libraries with the ratios etrace / braintrace (below 1: etrace is faster or
smaller). Needs only the standard library.

```
python benchmarks/compare_peer.py
```

Writes `benchmarks/results/peer_comparison.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from configs import format_table, MiB


RESULTS = pathlib.Path(__file__).parent / "results"
KEYS = ("model", "hidden", "batch", "T", "algorithm")
MEASURES = ("step_seconds", "compile_seconds", "temp_bytes", "trace_bytes_per_example")
ENVIRONMENT = (
    "backend",
    "device",
    "jax",
    "python",
    "etrace",
    "equinox",
    "braintrace",
    "brainstate",
    "brainpy",
)


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def merge(ours: dict[str, Any], peer: dict[str, Any]) -> list[dict[str, Any]]:
    index = {tuple(r[k] for k in KEYS): r for r in peer["results"]}
    rows = []
    for r in ours["results"]:
        other = index.get(tuple(r[k] for k in KEYS))
        if other is None:
            continue
        merged = {k: r[k] for k in KEYS}
        for m in MEASURES:
            merged[f"etrace_{m}"] = r.get(m)
            merged[f"braintrace_{m}"] = other.get(m)
            merged[f"{m}_ratio"] = _ratio(r.get(m), other.get(m))
        rows.append(merged)
    return rows


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1e3 * s:.1f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = [
        "model",
        "algorithm",
        "H",
        "T",
        "etrace ms",
        "braintrace ms",
        "time ratio",
        "compile s (e/b)",
        "temp MiB (e/b)",
    ]
    body = []
    for r in rows:
        ec, bc = r["etrace_compile_seconds"], r["braintrace_compile_seconds"]
        et, bt = r["etrace_temp_bytes"], r["braintrace_temp_bytes"]
        body.append(
            [
                r["model"],
                r["algorithm"],
                str(r["hidden"]),
                str(r["T"]),
                _ms(r["etrace_step_seconds"]),
                _ms(r["braintrace_step_seconds"]),
                _x(r["step_seconds_ratio"]),
                f"{ec:.2f} / {bc:.2f}",
                "-" if et is None or bt is None else f"{et / MiB:.2f} / {bt / MiB:.2f}",
            ]
        )
    return format_table(head, body)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", type=pathlib.Path, default=RESULTS / "training.json")
    parser.add_argument(
        "--peer", type=pathlib.Path, default=RESULTS / "peer_braintrace.json"
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=RESULTS / "peer_comparison.json"
    )
    args = parser.parse_args(argv)
    ours = json.loads(args.ours.read_text())
    peer = json.loads(args.peer.read_text())
    rows = merge(ours, peer)
    if not rows:
        raise SystemExit(
            f"No configuration is in both {args.ours} and {args.peer}: run both "
            "benchmarks with the same size options."
        )
    for name, record in (("etrace", ours), ("braintrace", peer)):
        found = {k: record[k] for k in ENVIRONMENT if k in record}
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print("\ntime per training step (median); ratio = etrace / braintrace")
    print(table(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "peer_comparison",
        "etrace": {k: v for k, v in ours.items() if k != "results"},
        "braintrace": {k: v for k, v in peer.items() if k != "results"},
        "results": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
