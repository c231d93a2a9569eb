"""A closed-loop load of real HTTP clients (threads) against a router or an engine: each client sends
completions back to back, streamed and not, and every request's outcome is recorded with its times."""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass
class Outcome:
    start: float
    end: float
    stream: bool
    status: int
    ok: bool
    error: str = ""
    events: list[str] = field(default_factory=list)
    retry_after: str | None = None  # a stream's data lines, [DONE] included

    @property
    def ended_cleanly(self) -> bool:
        """A stream that ends with `data: [DONE]` (an error event before it, if it failed)."""
        return not self.stream or (bool(self.events) and self.events[-1] == "[DONE]")


def request(url: str, body: dict, timeout: float = 60.0, headers: dict | None = None) -> Outcome:
    u = urlparse(url)
    start = time.monotonic()
    stream = bool(body.get("stream"))
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        if not stream or resp.status != 200:
            raw = resp.read()
            ok = resp.status == 200
            return Outcome(start, time.monotonic(), stream, resp.status, ok, "" if ok else raw.decode(errors="replace"),
                           retry_after=resp.getheader("Retry-After"))
        events = []
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
        errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
        ok = not errors and events[-1:] == ["[DONE]"]
        return Outcome(start, time.monotonic(), stream, resp.status, ok, "; ".join(errors) or
                       ("" if ok else "stream ended without [DONE]"), events)
    except (OSError, http.client.HTTPException) as e:
        return Outcome(start, time.monotonic(), stream, -1, False, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


class Load:
    def __init__(self, url: str, model: str, concurrency: int = 16, max_tokens: tuple[int, int] = (4, 24),
                 headers: dict | None = None, seed: int = 0):
        self.url, self.model, self.concurrency, self.max_tokens = url + "/v1/completions", model, concurrency, max_tokens
        self.headers = headers
        self.results: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed + i,), daemon=True)
                         for i in range(concurrency)]

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            body = {"model": self.model, "prompt": [rng.randrange(3, 300) for _ in range(rng.randrange(2, 40))],
                    "max_tokens": rng.randrange(*self.max_tokens), "ignore_eos": True, "temperature": 0.0,
                    "stream": rng.random() < 0.5}
            outcome = request(self.url, body, headers=self.headers)
            with self._lock:
                self.results.append(outcome)

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def done(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.done()} of {count} requests finished in {timeout}s")
            time.sleep(0.02)

    def wait_for_more(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` more requests than now have finished."""
        self.wait_for(self.done() + count, timeout)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(90)
        return self.results
