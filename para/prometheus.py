"""The server's counters, gauges and histograms, written in Prometheus' text format for
GET /metrics (the families vLLM and TGI expose, named para_*). Written by hand: the format is
a few lines per family, not worth a dependency."""

from __future__ import annotations

import bisect
import threading
from typing import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)

FAMILIES = {   # name: (type, help)
    "para_requests_total": ("counter", "Requests answered, by model and outcome (stop, length, cancelled, "
                                       "bad_request, unauthorized, overloaded, error)."),
    "para_prompt_tokens_total": ("counter", "Prompt tokens of the requests admitted, by model."),
    "para_completion_tokens_total": ("counter", "Tokens generated, by model."),
    "para_queue_depth": ("gauge", "Requests waiting to be admitted to the batch."),
    "para_running_rows": ("gauge", "Rows decoding in the batch."),
    "para_open_connections": ("gauge", "HTTP connections open."),
    "para_adapters_loaded": ("gauge", "Adapter slots in the bank that hold an adapter."),
    "para_time_to_first_token_seconds": ("histogram", "From a request's arrival to its first token."),
    "para_time_per_output_token_seconds": ("histogram", "Mean time between a request's later tokens."),
    "para_adapter_loads_total": ("counter", "Adapters put into a slot of the bank."),
    "para_adapter_evictions_total": ("counter", "Adapters evicted from a slot to make room for another."),
    "para_adapter_read_seconds": ("histogram", "Reading and checking an adapter file before a load."),
}


class Metrics:
    def __init__(self, gauges: dict[str, Callable[[], float]] | None = None):
        """`gauges` maps gauge families to functions read at each scrape (0 until given)."""
        self.gauges = dict(gauges or {})
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.histograms: dict[tuple[str, tuple], list] = {}   # (name, labels) -> [bucket counts, sum, count]
        for name in ("para_adapter_loads_total", "para_adapter_evictions_total"):   # unlabelled: 0 from the start
            self.counters[name, ()] = 0

    def count(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            buckets, total, n = self.histograms.get(key, ([0] * len(LATENCY_BUCKETS), 0.0, 0))
            index = bisect.bisect_left(LATENCY_BUCKETS, value)
            if index < len(buckets):
                buckets[index] += 1
            self.histograms[key] = [buckets, total + value, n + 1]

    def render(self) -> str:
        lines = []
        with self.lock:
            counters, histograms = dict(self.counters), {k: list(v) for k, v in self.histograms.items()}
        for name, (kind, help_text) in FAMILIES.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "gauge":
                lines.append(f"{name} {float(self.gauges.get(name, lambda: 0)())}")
            elif kind == "counter":
                lines += [f"{name}{labelled(labels)} {value}" for (n, labels), value in sorted(counters.items())
                          if n == name]
            else:
                for (n, labels), (buckets, total, count) in sorted(histograms.items()):
                    if n != name:
                        continue
                    cumulative = 0
                    for bound, c in zip(LATENCY_BUCKETS, buckets):
                        cumulative += c
                        lines.append(f"{name}_bucket{labelled(labels + (('le', repr(bound)),))} {cumulative}")
                    lines += [f"{name}_bucket{labelled(labels + (('le', '+Inf'),))} {count}",
                              f"{name}_sum{labelled(labels)} {total}", f"{name}_count{labelled(labels)} {count}"]
        return "\n".join(lines) + "\n"


def labelled(labels: tuple) -> str:
    if not labels:
        return ""
    escape = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}"
