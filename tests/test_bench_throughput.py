"""`slipstream bench throughput` helpers that run without a GPU (the bench itself needs CUDA)."""
from engine.bench.throughput import draw_workload, in_fresh_process


def test_workload_is_seeded_and_in_range():
    a = draw_workload(16, 100, 1024, 512, seed=0)
    assert a == draw_workload(16, 100, 1024, 512, seed=0) and a != draw_workload(16, 100, 1024, 512, seed=1)
    assert all(100 <= len(ids) <= 1024 and 100 <= n <= 512 for ids, n in a)


def test_fresh_process_returns_the_result_and_draws_the_same_workload():
    # each configuration runs in its own spawned process: the workload must not depend on the process
    assert in_fresh_process(draw_workload, 8, 100, 300, 200, 0) == draw_workload(8, 100, 300, 200, 0)
