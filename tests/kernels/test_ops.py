"""The decoder's ops (kernels/c/ops_*.c) against numpy, for every ISA this CPU runs.

Each op of each ISA's table runs over odd lengths (SIMD bodies plus scalar
tails) on read-only inputs where the op only reads them. Tolerances are named
per op: the AVX2 twins use a polynomial exp and 8-lane float sums, the
generic ones libm expf and double sums. f32 -> f16 is exact (round to nearest
even) on every ISA. Also: the thread pool's own cost, measured and bounded.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.kernels import _native, dispatch

ISAS = dispatch.available_isas()
SIZES = [1, 7, 8, 31, 33, 64, 255, 2049]

RMSNORM_RTOL = 2e-6     # float32 products; double or 8-lane float mean of squares
SOFTMAX_RTOL = 2e-6     # exp within ~2 ulp, normalized by a double/float sum
SWIGLU_RTOL = 2e-6
ROPE_ATOL = 1e-6        # two float products per output, values O(1)
ATTN_ATOL = 2e-6        # scores, softmax and the weighted sum of f16 values
GEGLU_ULP = 1           # gelu table entries: numpy's float32 tanh vs libm tanhf, rounded to f16
GEGLU_ATOL = 1e-6       # x < -4: 1 + tanh cancels, so the two tanh's differ by ulps of a < 1e-6 gelu


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@pytest.fixture(params=ISAS)
def isa(request):
    return request.param


def test_every_isa_has_an_ops_table():
    assert ISAS[0] == "generic"
    for name in ISAS:
        assert _native.ops_name(name) in ("generic", "avx2")   # avx512/neon fall back in one place
    if "avx2" in ISAS:
        assert _native.ops_name("avx2") == "avx2"


# ---------------------------------------------------------------------------
# element-wise ops
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_rmsnorm(isa, n):
    rng = np.random.default_rng(n)
    x, w = _ro(rng.standard_normal(n, dtype=np.float32) * 3), _ro(rng.standard_normal(n, dtype=np.float32))
    y = np.empty(n, np.float32)
    _native.op_rmsnorm(isa, x, w, y, 1e-5)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5) * w
    np.testing.assert_allclose(y, ref, rtol=RMSNORM_RTOL, atol=1e-7)


def test_rmsnorm_of_zeros_is_zero(isa):
    x, w = np.zeros(33, np.float32), np.ones(33, np.float32)
    y = np.full(33, np.nan, np.float32)
    _native.op_rmsnorm(isa, x, w, y, 1e-6)
    assert np.all(y == 0)


@pytest.mark.parametrize("n", SIZES)
def test_softmax(isa, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    ref = np.exp(x.astype(np.float64) - x.max())
    ref /= ref.sum()
    _native.op_softmax(isa, x)
    np.testing.assert_allclose(x, ref, rtol=SOFTMAX_RTOL, atol=1e-12)
    assert abs(x.sum(dtype=np.float64) - 1) < 1e-5


def test_softmax_extreme_range(isa):
    x = np.array([0, -200, 80, -1e30, 85] + [-90] * 11, dtype=np.float32)  # past exp's float range
    ref = np.exp(x.astype(np.float64) - 85)
    ref /= ref.sum()
    _native.op_softmax(isa, x)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x, ref, rtol=SOFTMAX_RTOL, atol=1e-30)


@pytest.mark.parametrize("n", SIZES)
def test_swiglu(isa, n):
    rng = np.random.default_rng(n)
    g, u = _ro(rng.standard_normal(n, dtype=np.float32) * 4), _ro(rng.standard_normal(n, dtype=np.float32))
    y = np.empty(n, np.float32)
    _native.op_swiglu(isa, g, u, y)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(y, g64 / (1 + np.exp(-g64)) * u, rtol=SWIGLU_RTOL, atol=1e-7)


def gelu_table_ref() -> np.ndarray:
    """ggml's table: f16(gelu_f32(x)) for every f16 x, the tanh formula in float32."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        inner = np.float32(0.79788456080286535587989211986876) * x * (1 + np.float32(0.044715) * x * x)
        return (np.float32(0.5) * x * (1 + np.tanh(inner))).astype(np.float16)


@pytest.mark.parametrize("n", SIZES)
def test_geglu_uses_ggmls_f16_gelu_table(isa, n):
    rng = np.random.default_rng(n)
    g = rng.standard_normal(n, dtype=np.float32) * 4
    g[: min(n, 4)] = [-10.0, 10.0, -12.5, 30.0][: min(n, 4)]   # the exact branches: 0 and x
    g, u = _ro(g), _ro(rng.standard_normal(n, dtype=np.float32))
    y = np.empty(n, np.float32)
    _native.op_geglu(isa, g, u, y)
    table = gelu_table_ref()
    gelu = table[g.astype(np.float16).view(np.uint16)].astype(np.float32)
    gelu = np.where(g <= -10, 0.0, np.where(g >= 10, g, gelu)).astype(np.float32)
    # one f16 ulp of the gelu value at most (libm tanhf vs numpy's tanh before rounding)
    ulp = np.abs(np.spacing(gelu.astype(np.float16))).astype(np.float32) * GEGLU_ULP
    # ... plus the float32 rounding of the product
    tol = (ulp + GEGLU_ATOL) * np.abs(u) + np.abs(gelu * u) * 2.0 ** -23
    assert np.all(np.abs(y - gelu * u) <= tol), \
        f"worst at {np.argmax(np.abs(y - gelu * u))}"


def test_geglu_is_the_same_on_every_isa():
    rng = np.random.default_rng(5)
    g, u = _ro(rng.standard_normal(4099, dtype=np.float32) * 6), _ro(rng.standard_normal(4099, dtype=np.float32))
    outs = []
    for name in ISAS:
        y = np.empty(4099, np.float32)
        _native.op_geglu(name, g, u, y)
        outs.append(y)
    assert all(np.array_equal(outs[0], y) for y in outs[1:])


@pytest.mark.parametrize("n", SIZES)
def test_add_is_exact(isa, n):
    rng = np.random.default_rng(n)
    y, x = rng.standard_normal(n, dtype=np.float32), _ro(rng.standard_normal(n, dtype=np.float32))
    ref = y + x
    _native.op_add(isa, y, x)
    assert np.array_equal(y, ref)


@pytest.mark.parametrize("n", SIZES)
def test_to_f16_rounds_like_numpy(isa, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, n)
    x[: min(n, 4)] = [65504, 65520, 1e-8, -0.0][: min(n, 4)]  # max, overflow to inf, subnormal, -0
    y = np.empty(n, np.uint16)
    _native.op_to_f16(isa, _ro(x.astype(np.float32)), y)
    with np.errstate(over="ignore"):   # 65520 -> inf is the point
        assert np.array_equal(y, x.astype(np.float16).view(np.uint16))


# ---------------------------------------------------------------------------
# rope
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("neox", [False, True], ids=["pairs", "halves"])
@pytest.mark.parametrize("head_dim,rope_dim", [(64, 64), (34, 34), (128, 96), (18, 2)])
def test_rope(isa, neox, head_dim, rope_dim):
    rng = np.random.default_rng(head_dim)
    x = rng.standard_normal((3, head_dim), dtype=np.float32)
    ang = 37 * 10000.0 ** (-2.0 * np.arange(rope_dim // 2) / rope_dim)
    cs = _ro(np.stack([np.cos(ang), np.sin(ang)], -1).astype(np.float32).reshape(-1))
    c, s = cs[0::2].astype(np.float64), cs[1::2].astype(np.float64)
    ref = x.astype(np.float64)
    if neox:
        a, b = ref[:, : rope_dim // 2].copy(), ref[:, rope_dim // 2: rope_dim].copy()
        ref[:, : rope_dim // 2], ref[:, rope_dim // 2: rope_dim] = a * c - b * s, a * s + b * c
    else:
        a, b = ref[:, 0:rope_dim:2].copy(), ref[:, 1:rope_dim:2].copy()
        ref[:, 0:rope_dim:2], ref[:, 1:rope_dim:2] = a * c - b * s, a * s + b * c
    _native.op_rope(isa, x, head_dim, rope_dim, cs, neox)
    np.testing.assert_allclose(x, ref, atol=ROPE_ATOL)


# ---------------------------------------------------------------------------
# attention over an f16 cache
# ---------------------------------------------------------------------------

def attention_ref(q, K, V, pos0, n_head, n_kv, hd, window=0, softcap=0.0):
    """q (B, n_head*hd), K/V f16 (S, n_kv*hd) -> (B, n_head*hd), float64, causal, GQA.
    Position t is in row t % S (a ring when the window is shorter than the positions)."""
    B, S = q.shape[0], K.shape[0]
    Kf, Vf = K.view(np.float16).astype(np.float64), V.view(np.float16).astype(np.float64)
    out = np.zeros((B, n_head * hd))
    for b in range(B):
        p_ = pos0 + b
        rows = np.arange(max(0, p_ - window + 1) if window else 0, p_ + 1) % S
        for h in range(n_head):
            g = h // (n_head // n_kv)
            k, v = Kf[rows, g * hd:(g + 1) * hd], Vf[rows, g * hd:(g + 1) * hd]
            s = k @ q[b, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            if softcap:
                s = softcap * np.tanh(s / softcap)
            p = np.exp(s - s.max())
            out[b, h * hd:(h + 1) * hd] = (p / p.sum()) @ v
    return out


@pytest.mark.parametrize("B,pos0,n_head,n_kv,hd", [
    (1, 0, 4, 4, 64),        # decode, first position, MHA
    (1, 40, 8, 2, 64),       # decode, GQA 4:1
    (5, 3, 6, 3, 33),        # causal batch, odd head size (scalar tails)
    (9, 0, 4, 1, 128),       # prefill from empty, MQA
    (6, 2, 4, 2, 96),        # one 64-value register block plus a leftover 32
    (3, 7, 16, 1, 64),       # 16 query heads on one KV head: two runs of 8 shared heads
    (2, 5, 18, 2, 64),       # groups of 9: runs of 3 (the largest divisor up to 8)
])
def test_attention(isa, B, pos0, n_head, n_kv, hd):
    rng = np.random.default_rng(B * 100 + pos0)
    S = pos0 + B + 2                             # cache rows past the causal edge must not count
    q = _ro(rng.standard_normal((B, n_head * hd), dtype=np.float32))
    K = _ro(rng.standard_normal((S, n_kv * hd)).astype(np.float16).view(np.uint16))
    V = _ro(rng.standard_normal((S, n_kv * hd)).astype(np.float16).view(np.uint16))
    out = np.empty((B, n_head * hd), np.float32)
    _native.op_attention(isa, q, K, V, pos0, n_head, n_kv, hd, out)
    np.testing.assert_allclose(out, attention_ref(q, K, V, pos0, n_head, n_kv, hd), atol=ATTN_ATOL * np.sqrt(hd))


@pytest.mark.parametrize("B,pos0,window,rows,softcap", [
    (1, 50, 8, 8, 0.0),      # decode in a ring of exactly the window
    (4, 30, 8, 11, 0.0),     # a chunk whose keys wrap around the ring's end
    (6, 0, 4, 9, 0.0),       # prefill from empty: the window cuts in at position 4
    (3, 20, 0, 23, 5.0),     # no window, soft-capped scores (gemma2)
    (5, 37, 16, 20, 2.0),    # both
])
@pytest.mark.parametrize("n_head,n_kv,hd", [(4, 2, 32), (2, 1, 48), (3, 3, 20)])
def test_attention_window_ring_and_softcap(isa, B, pos0, window, rows, softcap, n_head, n_kv, hd):
    rng = np.random.default_rng(pos0 * 7 + B)
    q = _ro(rng.standard_normal((B, n_head * hd), dtype=np.float32) * 2)
    K = _ro(rng.standard_normal((rows, n_kv * hd)).astype(np.float16).view(np.uint16))
    V = _ro(rng.standard_normal((rows, n_kv * hd)).astype(np.float16).view(np.uint16))
    out = np.empty((B, n_head * hd), np.float32)
    _native.op_attention(isa, q, K, V, pos0, n_head, n_kv, hd, out, window=window, softcap=softcap)
    want = attention_ref(q, K, V, pos0, n_head, n_kv, hd, window, softcap)
    np.testing.assert_allclose(out, want, atol=ATTN_ATOL * np.sqrt(hd))


def test_attention_ring_gives_the_full_caches_numbers(isa):
    """The same keys in a ring and in a full cache: the same sums, bit for bit (position
    order is kept across the wrap), which is what makes chunked prefill exact."""
    rng = np.random.default_rng(3)
    n_pos, window, rows, hd = 40, 10, 13, 32
    Kfull = rng.standard_normal((n_pos, 2 * hd)).astype(np.float16).view(np.uint16)
    Vfull = rng.standard_normal((n_pos, 2 * hd)).astype(np.float16).view(np.uint16)
    ring_k, ring_v = np.zeros((rows, 2 * hd), np.uint16), np.zeros((rows, 2 * hd), np.uint16)
    for t in range(n_pos - 3):   # the ring after writing positions 0..36 in order
        ring_k[t % rows], ring_v[t % rows] = Kfull[t], Vfull[t]
    for t in range(n_pos - 3, n_pos):
        ring_k[t % rows], ring_v[t % rows] = Kfull[t], Vfull[t]
    q = rng.standard_normal((3, 4 * hd), dtype=np.float32)
    a, b = np.empty((3, 4 * hd), np.float32), np.empty((3, 4 * hd), np.float32)
    _native.op_attention(isa, q, Kfull, Vfull, n_pos - 3, 4, 2, hd, a, window=window)
    _native.op_attention(isa, q, ring_k, ring_v, n_pos - 3, 4, 2, hd, b, window=window)
    assert np.array_equal(a, b)


def test_attention_rejects_shapes_out_of_the_cache():
    q = np.zeros((4, 64), np.float32)
    K = V = np.zeros((3, 64), np.uint16)
    with pytest.raises(ValueError):
        _native.op_attention("generic", q, K, V, 0, 1, 1, 64, np.empty((4, 64), np.float32))


# ---------------------------------------------------------------------------
# the thread pool's own cost
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
def test_pool_runs_thousands_of_barriers_and_reports_their_cost(threads):
    """Every thread passes every barrier (no deadlock, no lost wake-up) and the cost
    measurement comes back finite. How small that cost is is a benchmark number
    (bench/results/cpu-xeon-vm.md: "Overheads", measured with `_native.pool_costs`): the
    machine is shared, so a timed assertion here would measure the neighbours."""
    per_op, per_run = _native.pool_costs(threads, n_ops=2000, n_runs=200)
    print(f"{threads} threads: {per_op * 1e6:.2f} us per barrier, {per_run * 1e6:.2f} us per run")
    assert 0 < per_op < 1.0 and 0 < per_run < 1.0
