"""Which products the skinny split-K GEMM takes (kernels/linear.py), and the CPU path of `linear`."""
import torch

from kernels.linear import SKINNY_MAX_ROWS, linear, skinny_config
from kernels.triton.skinny_configs import TUNED, TUNED_FP8, SkinnyConfig, fits_workspace


def test_skinny_config_rules():
    bf16 = torch.bfloat16
    split = lambda m, n, k, dtype=bf16: None if (c := skinny_config(m, n, k, dtype)) is None else c.S
    # Qwen3-0.6B's projections at one row (the rule): wide outputs need no split, the 1024-wide ones split K 4 ways
    assert [split(1, n, k) for n, k in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072))] == [1, 4, 1, 4]
    assert split(1, 2048, 1024) == 2
    assert split(1, 1024, 128) == 1  # K too short to split
    assert split(SKINNY_MAX_ROWS, 1024, 2048) == 4
    assert split(SKINNY_MAX_ROWS + 1, 1024, 2048) is None  # cuBLAS wins on larger batches
    assert split(0, 1024, 2048) is None
    assert split(1, 1000, 2048) is None  # N not a multiple of the 64-row tile
    assert split(1, 1024, 1000) is None  # K not a multiple of the 128-column step
    assert split(1, 1024, 2048, torch.float32) is None


def test_tuned_skinny_configs_tile_their_shapes():
    """Every tuned config divides its shape (N by the column tile, K by split x K step) and fits the kernel's
    workspace (tile counters and float32 partials for 16 rows); rows limits increase to the kernel's 16.
    Block-FP8 weights' configs step K within the 128-column scale blocks, tuned or taken from bf16's table."""
    for table, fp8 in ((TUNED, False), (TUNED_FP8, True)):
        for (n, k), rows in table.items():
            assert [r for r, _ in rows] == sorted(r for r, _ in rows) and rows[-1][0] == SKINNY_MAX_ROWS
            for m, cfg in rows:
                assert isinstance(cfg, SkinnyConfig) and skinny_config(m, n, k, torch.bfloat16, fp8) == cfg
                assert n % cfg.BN == 0 and k % (cfg.S * cfg.BK) == 0, (n, k, cfg)
                assert fits_workspace(n // cfg.BN, cfg.S, cfg.BN), (n, k, cfg)
    for (n, k), rows in TUNED.items():
        for m, cfg in rows:
            fp8 = skinny_config(m, n, k, torch.bfloat16, fp8=True)
            assert 128 % fp8.BK == 0 and (fp8 == cfg._replace(BK=min(cfg.BK, 128)) or (n, k) in TUNED_FP8)


def test_linear_on_cpu_is_torch():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 256), torch.randn(128, 256), torch.randn(128)
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.equal(linear(x, w), x @ w.t())


def test_block_fp8_rows_past_sixteen_take_wider_row_tiles():
    """Block-FP8 weights take the skinny GEMM up to FP8_MAX_ROWS rows (32- then 64-row tiles whose split-K
    partials fit the workspace); bf16 weights stop at 16 rows; past FP8_MAX_ROWS the FP8-math GEMM."""
    from kernels.triton.skinny_configs import FP8_MAX_ROWS
    bf16 = torch.bfloat16
    for n, k in ((5120, 2048), (2048, 4096), (3648, 2048), (22528, 2048), (2112, 7168), (576, 1536)):
        for m in (17, 64, 65, 130, FP8_MAX_ROWS):
            cfg = skinny_config(m, n, k, bf16, fp8=True)
            assert cfg.BM == (32 if m <= 64 else 64) and 128 % cfg.BK == 0, (n, k, m, cfg)
            assert n % cfg.BN == 0 and k % (cfg.S * cfg.BK) == 0
            assert fits_workspace(n // cfg.BN * -(-m // cfg.BM), cfg.S, cfg.BN, cfg.BM)
            assert skinny_config(m, n, k, bf16) is None
        assert skinny_config(FP8_MAX_ROWS + 1, n, k, bf16, fp8=True) is None
    assert skinny_config(130, 2000, 2048, bf16, fp8=True) is None  # N does not tile
