"""The router's engine choice: least loaded (running requests, then KV usage), round-robin among equals."""
from engine.router.pool import EnginePool, Node


def test_pick_prefers_least_running_then_kv_usage_then_round_robin():
    pool = EnginePool()
    a, b, c = (Node(url=f"http://e{i}", role="prefill", models={"m"}) for i in range(3))
    for n in (a, b, c):
        pool.add(n)
    a.running, b.running, c.running = 3, 1, 1
    b.kv_usage, c.kv_usage = 0.5, 0.2
    assert pool.pick("prefill", "m") is c
    c.inflight = 2  # the router's own count wins when the engine's report is stale
    assert pool.pick("prefill", "m") is b
    a.running = b.running = c.running = c.inflight = 0
    b.kv_usage = c.kv_usage = 0.0
    assert {pool.pick("prefill", "m").url for _ in range(6)} == {a.url, b.url, c.url}
    assert pool.pick("prefill", "m", exclude={a.url, b.url}) is c
    assert pool.pick("decode", "m") is None and pool.pick("prefill", "other") is None


def test_discovered_nodes_replace_each_other_but_keep_manual_ones():
    pool = EnginePool()
    pool.add(Node(url="http://manual", role="hybrid"))
    pool.replace_discovered([Node(url="http://d1", role="decode", source="ctrl")])
    pool.replace_discovered([Node(url="http://d2", role="decode", source="ctrl")])
    assert set(pool.nodes) == {"http://manual", "http://d2"}
