"""Prometheus text exposition of the front's request timings and the core's stats, written by hand
(counters, gauges and cumulative histograms; no client library)."""
from __future__ import annotations

import bisect
import time

from engine.wire import EngineStats

PREFIXES = {"slipstream": "slipstream:", "vllm": "vllm:"}  # vllm: the names vLLM's dashboards and autoscalers read
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def render(self, prefix: str, labels: str) -> list[str]:
        name = prefix + self.name
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.sum}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    def __init__(self, model_name: str = "", names: str = "slipstream"):
        self.model_name = model_name
        self.prefix = PREFIXES[names]
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token, per sample.", TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Request latency, arrival to last token.", E2E_BUCKETS)
        self.queue = Histogram("request_queue_time_seconds", "Time a sample waited in the engine's queue before "
                               "its first scheduling.", TTFT_BUCKETS)
        self.prefill = Histogram("request_prefill_time_seconds", "From first scheduling to the first token.",
                                 TTFT_BUCKETS)
        self.decode = Histogram("request_decode_time_seconds", "From the first token to the last, per request.",
                                E2E_BUCKETS)
        self.request_prompt = Histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation = Histogram("request_generation_tokens", "Output tokens per request (all samples).",
                                            TOKEN_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejections: dict[int, int] = {}
        self.stats: EngineStats | None = None  # the core's, from the latest heartbeat
        self._rate_mark: tuple[float, int] | None = None
        self.tokens_per_s = 0.0

    # hooks ----------------------------------------------------------------------------------------
    def observe_first_token(self, seconds: float, queue_seconds: float | None = None) -> None:
        self.ttft.observe(seconds)
        if queue_seconds is not None:
            self.queue.observe(queue_seconds)
            self.prefill.observe(max(0.0, seconds - queue_seconds))

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_started(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens += num_prompt_tokens

    def request_finished(self, output, seconds: float, decode_seconds: float | None = None) -> None:
        if output is None:
            return
        self.e2e.observe(seconds)
        if decode_seconds is not None:
            self.decode.observe(decode_seconds)
        self.request_prompt.observe(len(output.prompt_token_ids or ()))
        self.request_generation.observe(sum(len(c.token_ids) for c in output.outputs))
        for c in output.outputs:
            self.generation_tokens += len(c.token_ids)
            reason = c.finish_reason or "unknown"
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def rejected(self, status: int) -> None:
        self.rejections[status] = self.rejections.get(status, 0) + 1

    def update_stats(self, stats: EngineStats) -> None:
        """A heartbeat's engine stats; the generation rate is measured between heartbeats."""
        now = time.monotonic()
        if self._rate_mark is not None and now > self._rate_mark[0]:
            self.tokens_per_s = (stats.num_generated_tokens - self._rate_mark[1]) / (now - self._rate_mark[0])
        self._rate_mark = (now, stats.num_generated_tokens)
        self.stats = stats

    # exposition -----------------------------------------------------------------------------------
    def render(self, in_flight: int) -> str:
        name = self.model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lab = f'model_name="{name}"'
        s = self.stats or EngineStats()
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        lines: list[str] = []

        def _metric(kind: str, name: str, help: str, samples: list[tuple[str, float]]) -> list[str]:
            full = self.prefix + name
            return [f"# HELP {full} {help}", f"# TYPE {full} {kind}"] + [f"{full}{{{la}}} {v}" for la, v in samples]
        lines += _metric("gauge", "num_requests_running", "Sequences in the engine's running batch.",
                         [(lab, s.num_running)])
        lines += _metric("gauge", "num_requests_waiting", "Sequences waiting for admission (queue depth).",
                         [(lab, s.num_waiting)])
        lines += _metric("gauge", "num_requests_in_flight", "HTTP requests this front is serving.",
                         [(lab, in_flight)])
        lines += _metric("gauge", "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                         [(lab, s.kv_usage)])
        lines += _metric("gauge", "num_kv_blocks", "KV-cache blocks in the pool.", [(lab, s.num_blocks)])
        lines += _metric("gauge", "num_free_kv_blocks", "Free KV-cache blocks.", [(lab, s.num_free_blocks)])
        lines += _metric("counter", "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                         [(lab, s.prefix_cache_queries)])
        lines += _metric("counter", "prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
                         [(lab, s.prefix_cache_hits)])
        lines += _metric("gauge", "prefix_cache_hit_rate", "Prefix-cache hits / queries since start.",
                         [(lab, hit_rate)])
        lines += _metric("counter", "num_preemptions_total", "Sequences preempted (KV recomputed).",
                         [(lab, s.num_preemptions)])
        lines += _metric("gauge", "generation_tokens_per_second", "Engine output tokens/s between heartbeats.",
                         [(lab, self.tokens_per_s)])
        lines += _metric("counter", "prompt_tokens_total", "Prompt tokens of admitted requests.",
                         [(lab, self.prompt_tokens)])
        lines += _metric("counter", "generation_tokens_total", "Output tokens of finished requests.",
                         [(lab, self.generation_tokens)])
        lines += _metric("counter", "request_success_total", "Finished samples by finish reason.",
                         [(f'{lab},finished_reason="{r}"', n) for r, n in sorted(self.finished.items())])
        lines += _metric("counter", "request_rejected_total", "Requests refused by the front, by HTTP status.",
                         [(f'{lab},status="{st}"', n) for st, n in sorted(self.rejections.items())])
        lines += _metric("counter", "spec_decode_num_draft_tokens_total", "Draft tokens fed to verify steps.",
                         [(lab, s.spec_draft_tokens)])
        lines += _metric("counter", "spec_decode_num_accepted_tokens_total", "Draft tokens the target kept.",
                         [(lab, s.spec_accepted_tokens)])
        lines += _metric("counter", "spec_decode_num_drafts_total", "Sequences verified with drafts (one per step).",
                         [(lab, s.spec_verify_rows)])
        lines += _metric("gauge", "spec_decode_acceptance_rate", "Accepted / draft tokens since start.",
                         [(lab, s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0)])
        lines += _metric("gauge", "spec_decode_tokens_per_step", "Tokens a verified sequence gains per step.",
                         [(lab, 1 + s.spec_accepted_tokens / s.spec_verify_rows if s.spec_verify_rows else 0.0)])
        gbps = s.kv_transfer_bytes / s.kv_transfer_ms / 1e6 if s.kv_transfer_ms else 0.0
        lines += _metric("counter", "kv_transfers_total", "KV pulls from prefill engines (any outcome).",
                         [(lab, s.kv_transfers)])
        lines += _metric("counter", "kv_transfers_failed_total", "KV pulls that failed or timed out.",
                         [(lab, s.kv_transfers_failed)])
        lines += _metric("counter", "kv_transfer_bytes_total", "Bytes moved by successful KV pulls.",
                         [(lab, s.kv_transfer_bytes)])
        lines += _metric("counter", "kv_transfer_seconds_total", "Wall time of successful KV pulls.",
                         [(lab, s.kv_transfer_ms / 1e3)])
        lines += _metric("gauge", "kv_transfer_gbps", "Mean GB/s of successful KV pulls since start.",
                         [(lab, gbps)])
        for h in (self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode, self.request_prompt,
                  self.request_generation):
            lines += h.render(self.prefix, lab)
        return "\n".join(lines) + "\n"
