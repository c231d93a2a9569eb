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


def test_a_node_discovery_stops_listing_stays_until_the_prober_drops_it():
    """An empty or partial listing (a restarted Redis) does not drop engines by itself: they are marked
    unlisted, stay pickable, and the router's prober removes them once their /health fails."""
    pool = EnginePool()
    pool.add(Node(url="http://manual", role="hybrid"))
    pool.replace_discovered([Node(url="http://d1", role="decode", source="ctrl")])
    pool.replace_discovered([Node(url="http://d2", role="decode", source="ctrl")])
    assert set(pool.nodes) == {"http://manual", "http://d1", "http://d2"}
    assert [n.url for n in pool.unlisted()] == ["http://d1"] and pool.pick("decode", None, {"http://d2"}).url == "http://d1"
    pool.replace_discovered([Node(url="http://d1", role="decode", source="ctrl")])  # registered again
    assert pool.nodes["http://d1"].listed and [n.url for n in pool.unlisted()] == ["http://d2"]


def test_circuit_breaker_backs_off_and_skips_down_nodes():
    import time
    pool = EnginePool()
    a, b = Node(url="http://a", role="decode"), Node(url="http://b", role="decode")
    pool.add(a)
    pool.add(b)
    assert pool.mark_down(a, "refused") and not pool.mark_down(a, "refused again")
    assert a.backoff_s == 1.0 and a.next_probe > time.monotonic()
    assert {pool.pick("decode", None).url for _ in range(4)} == {"http://b"}
    assert pool.summary()["decode"] == {"up": 1, "down": 1} and pool.roles_for(None) == {"decode"}
    for _ in range(10):
        pool.mark_down(a, "still refused")
    assert a.backoff_s == 30.0  # capped
    assert pool.mark_up(a) and a.backoff_s == 0.0 and pool.pick("decode", None, {"http://b"}) is a
    pool.add(Node(url="http://b", role="decode"))  # re-discovered: the router's evidence carries over
    pool.mark_down(pool.nodes["http://b"], "refused")
    pool.add(Node(url="http://b", role="decode"))
    assert pool.nodes["http://b"].down
