"""In-process metrics: per-tool call counts and latencies, generation throughput, memory.

Read through the `rkllm://metrics` resource (JSON) and, on the HTTP transports, `/metrics`
(Prometheus text format, behind the same bearer token as the MCP endpoint).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mcp_rkllm.runtime.base import process_memory_mb

#: Latency samples kept per tool for the p95 (a sliding window).
WINDOW = 1024


@dataclass
class _Tool:
    calls: int = 0
    successes: int = 0
    failures: int = 0
    total_ms: float = 0.0
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


class Metrics:
    """Counters the tools update; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tools: dict[str, _Tool] = {}
        self.runs = 0
        self.tokens = 0
        self.generate_seconds = 0.0
        self._ttft_ms: deque[float] = deque(maxlen=WINDOW)

    def call(self, tool: str, ok: bool, ms: float) -> None:
        """One finished tool call (cancelled calls are not counted)."""
        with self._lock:
            t = self._tools.setdefault(tool, _Tool())
            t.calls += 1
            t.successes += ok
            t.failures += not ok
            t.total_ms += ms
            t.recent_ms.append(ms)

    def run(self, tokens: int, seconds: float, first_token_ms: float | None) -> None:
        """One finished generation: its token count, its duration, time to its first token."""
        with self._lock:
            self.runs += 1
            self.tokens += tokens
            self.generate_seconds += seconds
            if first_token_ms is not None:
                self._ttft_ms.append(first_token_ms)

    def snapshot(self) -> dict[str, Any]:
        """Everything, as JSON-ready data."""
        with self._lock:
            tools = {name: {"calls": t.calls, "successes": t.successes, "failures": t.failures,
                            "mean_ms": round(t.total_ms / t.calls, 3) if t.calls else 0.0,
                            "p95_ms": round(_p95(t.recent_ms), 3)} for name, t in sorted(self._tools.items())}
            ttft = list(self._ttft_ms)
            return {
                "tools": tools,
                "generation": {
                    "runs": self.runs, "tokens": self.tokens,
                    "tokens_per_second": round(self.tokens / self.generate_seconds, 2) if self.generate_seconds
                    else 0.0,
                    "time_to_first_token_ms": {"mean": round(sum(ttft) / len(ttft), 3) if ttft else 0.0,
                                               "p95": round(_p95(ttft), 3)},
                },
                "memory": {"rss_mb": process_memory_mb("VmRSS"), "peak_rss_mb": process_memory_mb("VmHWM")},
            }

    def prometheus(self) -> str:
        """The Prometheus text exposition of snapshot()."""
        s = self.snapshot()
        lines = [
            "# HELP mcp_rkllm_tool_calls_total Tool calls by outcome.",
            "# TYPE mcp_rkllm_tool_calls_total counter",
        ]
        for name, t in s["tools"].items():
            lines.append(f'mcp_rkllm_tool_calls_total{{tool="{name}",outcome="success"}} {t["successes"]}')
            lines.append(f'mcp_rkllm_tool_calls_total{{tool="{name}",outcome="failure"}} {t["failures"]}')
        lines += ["# HELP mcp_rkllm_tool_latency_ms Tool call latency (mean and p95 of recent calls).",
                  "# TYPE mcp_rkllm_tool_latency_ms gauge"]
        for name, t in s["tools"].items():
            lines.append(f'mcp_rkllm_tool_latency_ms{{tool="{name}",stat="mean"}} {t["mean_ms"]}')
            lines.append(f'mcp_rkllm_tool_latency_ms{{tool="{name}",stat="p95"}} {t["p95_ms"]}')
        g = s["generation"]
        lines += [
            "# TYPE mcp_rkllm_runs_total counter", f"mcp_rkllm_runs_total {g['runs']}",
            "# TYPE mcp_rkllm_tokens_total counter", f"mcp_rkllm_tokens_total {g['tokens']}",
            "# TYPE mcp_rkllm_tokens_per_second gauge", f"mcp_rkllm_tokens_per_second {g['tokens_per_second']}",
            "# TYPE mcp_rkllm_time_to_first_token_ms gauge",
            f'mcp_rkllm_time_to_first_token_ms{{stat="mean"}} {g["time_to_first_token_ms"]["mean"]}',
            f'mcp_rkllm_time_to_first_token_ms{{stat="p95"}} {g["time_to_first_token_ms"]["p95"]}',
            "# TYPE mcp_rkllm_peak_rss_megabytes gauge", f"mcp_rkllm_peak_rss_megabytes {s['memory']['peak_rss_mb']}",
            "# TYPE mcp_rkllm_rss_megabytes gauge", f"mcp_rkllm_rss_megabytes {s['memory']['rss_mb']}",
        ]
        return "\n".join(lines) + "\n"


def _p95(values: Any) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]) if ordered else 0.0
