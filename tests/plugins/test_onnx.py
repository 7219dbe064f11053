"""The onnx backend: weight encodings, the graph cache, the runner contract, options.

The numerical oracle is the numpy reference backend (ember.plugins.reference)
and, in test_conformance.py, llama.cpp's logits. Models are either the
conformance files (skipped when absent) or tiny GGUFs written here by ember's
own writer, which lets a test reach switches no conformance file has (partial
rope, rope frequency factors).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
import onnxruntime as ort  # noqa: E402

from ember.formats import gguf, quant_blocks  # noqa: E402
from ember.plugins import onnx as onnx_backend  # noqa: E402
from ember.plugins import onnx_graph, reference, registry  # noqa: E402
from ember.formats.model_config import config_from_gguf  # noqa: E402
from ember.plugins.types import BackendError, ContextOverflow, MemoryPlan  # noqa: E402
from tests.conftest import conformance_path, kl_rows  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test builds graphs into its own cache dir."""
    d = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(d))
    return d


def _load(path, n_ctx=64, **options):
    f = gguf.open(path)
    return onnx_backend.OnnxRunner(f, config_from_gguf(f), n_ctx, None, options)


# ---------------------------------------------------------------------------
# Weights: GGML blocks -> MatMulNBits, checked by running the op itself
# ---------------------------------------------------------------------------

def _matmul_nbits(x: np.ndarray, q: onnx_graph.NBits, n: int, k: int) -> np.ndarray:
    """Run the decoder's own op sequence for one weight, float activations (exact)."""
    model = onnx_graph.matmul_model(q, k, n, accuracy_level=0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize("qtype,n,k", [(q, n, k) for q in ("Q4_0", "Q4_1", "Q8_0")
                                        for n, k in ((1, 32), (7, 96), (33, 256))]
                         + [(q, n, k) for q in ("Q4_K", "Q6_K")
                            for n, k in ((1, 256), (7, 512), (33, 256))])
def test_matmul_nbits_equals_dequantized_matmul(qtype, n, k, tmp_path):
    """Codes repacked, never dequantized: ORT's own op must reproduce the GGML values."""
    rng = np.random.default_rng(n * k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0, :32] = 0.0                                   # an all-zero block (d = 0)
    path = tmp_path / "w.gguf"
    gguf.write(path, {"general.architecture": "llama"},
               {"w": gguf.TensorData(qtype, (n, k), quant_blocks.quantize(qtype, w))})
    t = gguf.open(path).tensors["w"]
    q = onnx_graph.encode_nbits(t)
    assert q is not None and q.packed.shape == (n, k // q.block, q.block * q.bits // 8)
    x = rng.standard_normal((5, k)).astype(np.float32)
    want = x.astype(np.float64) @ t.numpy().astype(np.float64).T
    got = _matmul_nbits(x, q, n, k)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_q4_1_block_of_a_constant_is_exact():
    """d == 0, m != 0 (every value equal): the offset term alone carries it."""
    block = np.zeros(20, np.uint8)
    block[2:4] = np.frombuffer(np.float16(1.5).tobytes(), np.uint8)   # m = 1.5, d = 0
    t = gguf.GGUFTensor("w", "Q4_1", (1, 32), 0, 20, block)
    x = np.arange(32, dtype=np.float32)[None]
    np.testing.assert_allclose(_matmul_nbits(x, onnx_graph.encode_nbits(t), 1, 32),
                               [[1.5 * x.sum()]], rtol=1e-6)


def test_other_types_are_dense_and_counted_as_float32():
    f = gguf.open(conformance_path("models", "s512-llama-Q5_K_S.gguf"))
    t = f.tensors["blk.0.attn_q.weight"]
    assert t.type == "Q5_K" and onnx_graph.encode_nbits(t) is None
    entry = config_from_gguf(f).tensors["blk.0.attn_q.weight"]
    assert onnx_graph.encoded_bytes(entry) == 4 * int(np.prod(entry.shape))


@pytest.mark.parametrize("model", ["s512-llama-Q4_0.gguf", "s512-llama-Q4_1.gguf",
                                   "s512-llama-Q4_K_M.gguf", "s512-llama-Q6_K.gguf",
                                   "s512-llama-Q8_0.gguf"])
def test_plan_bytes_match_the_built_encoding(model):
    """The memory plan's per-tensor estimate equals what the encoder really produces."""
    f = gguf.open(conformance_path("models", model))
    c = config_from_gguf(f)
    for name, t in f.tensors.items():
        q = onnx_graph.encode_nbits(t) if len(t.shape) == 2 else None
        real = q.nbytes if q is not None else 4 * t.n_elements
        assert onnx_graph.encoded_bytes(c.tensors[name]) == real, name


# ---------------------------------------------------------------------------
# The graph cache
# ---------------------------------------------------------------------------

def test_graph_is_built_once_keyed_by_sha256_with_external_weights(cache):
    path = conformance_path("models", "s512-llama-Q4_0.gguf")
    r1 = _load(path)
    assert r1.info["graph_built_now"]
    folder = r1.graph.parent
    assert folder.parent == cache / "onnx"
    assert folder.name.startswith(onnx_backend.file_sha256(str(path)))
    weights = folder / "weights.bin"
    assert weights.stat().st_size > 50 * r1.graph.stat().st_size  # the .onnx stays small
    mtime = r1.graph.stat().st_mtime_ns
    r2 = _load(path)
    assert not r2.info["graph_built_now"] and r2.graph == r1.graph
    assert r2.graph.stat().st_mtime_ns == mtime
    assert [p.name for p in (cache / "onnx").iterdir()] == [folder.name]  # no temp leftovers


def test_big_models_build_in_a_child_process(monkeypatch, tmp_path):
    """Above BUILD_IN_PROCESS_BYTES the graph is built by a child (the daemon's peak stays
    planned); the child's graph computes the same logits as an in-process build."""
    path = conformance_path("models", "s512-llama-Q4_0.gguf")
    ids = [1, 5, 9, 200, 33]
    inproc = _load(path).prefill(ids, all_logits=True)
    monkeypatch.setattr(onnx_backend, "BUILD_IN_PROCESS_BYTES", 0)
    child = _load(path, cache_dir=str(tmp_path / "child"))
    assert child.info["graph_built_now"] and str(child.graph).startswith(str(tmp_path / "child"))
    np.testing.assert_array_equal(child.prefill(ids, all_logits=True), inproc)


@pytest.mark.parametrize("in_child", [False, True])
def test_graph_build_shows_progress_on_a_terminal_only(tmp_path, in_child):
    """A bar (layers built) on stderr when it is a terminal — also from the child builder,
    whose own stderr is a pipe for error messages."""
    import subprocess
    import sys

    from tests.daemon.terminal import run_on_tty
    path = conformance_path("models", "s512-llama-Q4_0.gguf")
    script = ("import sys; from pathlib import Path; from ember.formats import gguf; "
              "from ember.formats.model_config import config_from_gguf; from ember.plugins import onnx; "
              "f = gguf.open(sys.argv[1]); out = Path(sys.argv[2]); "
              "out.mkdir(); (onnx._build_in_child(f.path, out, 4) if sys.argv[3] == '1' "
              "else onnx.build_into(f, config_from_gguf(f), out, 4))")
    cmd = [sys.executable, "-c", script, str(path), str(tmp_path / "tty"), str(int(in_child))]
    rc, shown, _ = run_on_tty(cmd, stderr=True)
    assert rc == 0 and (tmp_path / "tty" / "model.onnx").is_file()
    assert b"building ONNX graph" in shown and b"2/2" in shown and b"100%" in shown
    cmd[-2] = str(tmp_path / "pipe")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""


def test_a_failed_child_build_is_a_clear_error(monkeypatch, tmp_path):
    path = tmp_path / "broken.gguf"
    _tiny_gguf(path, 16, False, drop="blk.1.ffn_up.weight")
    monkeypatch.setattr(onnx_backend, "BUILD_IN_PROCESS_BYTES", 0)
    with pytest.raises(BackendError, match="building the graph.*blk.1.ffn_up.weight"):
        _load(path)
    assert not any(p.name.endswith(".onnx") for p in (tmp_path / "cache").rglob("*"))


def test_accuracy_level_is_part_of_the_key():
    path = conformance_path("models", "s512-llama-Q4_0.gguf")
    a4, a0 = _load(path), _load(path, accuracy_level=0)
    assert a0.graph != a4.graph and a4.info["accuracy_level"] == onnx_backend.DEFAULT_ACCURACY == 4
    assert a0.info["accuracy_level"] == 0
    with pytest.raises(BackendError, match="accuracy_level"):
        _load(path, accuracy_level=7)


# ---------------------------------------------------------------------------
# The runner contract
# ---------------------------------------------------------------------------

def test_decode_equals_batched_pass():
    r = _load(conformance_path("models", "s512-qwen2-F32.gguf"), n_ctx=96)
    ids = np.random.default_rng(0).integers(3, r.n_vocab, size=90).tolist()
    batched = r.prefill(ids, all_logits=True)
    assert batched.shape == (90, r.n_vocab) and batched.dtype == np.float32
    r.reset()
    steps = [r.prefill(ids[:50], all_logits=True)]
    steps += [r.decode(t)[None] for t in ids[50:]]
    assert r.n_past == 90
    assert kl_rows(batched, np.concatenate(steps)).max() <= 1e-6


def test_truncate_rewinds_the_cache():
    r = _load(conformance_path("models", "stories260K.gguf"))
    ids = [1, 403, 407, 261, 378, 300, 30, 259, 271]
    full = r.prefill(ids, all_logits=True)
    r.truncate(5)
    again = r.prefill(ids[5:], all_logits=True)
    assert kl_rows(full[5:], again).max() <= 1e-9
    with pytest.raises(ValueError):
        r.truncate(100)


def test_context_overflow_and_bad_tokens_are_typed_errors():
    r = _load(conformance_path("models", "stories260K.gguf"), n_ctx=8)
    r.prefill([1, 2, 3, 4, 5, 6])
    with pytest.raises(ContextOverflow):
        r.prefill([7, 8, 9])
    assert r.n_past == 6                               # nothing was written
    with pytest.raises(onnx_backend.TokenOutOfRange):
        r.decode(r.n_vocab)
    r.reset()
    assert r.n_past == 0 and r.decode(1).shape == (r.n_vocab,)


def _tiny_gguf(path, rope_dim: int, freq_factors: bool, drop: str | None = None):
    """A random llama with a partial rope (and optional per-pair rope frequency factors)."""
    rng = np.random.default_rng(rope_dim)
    d, hd, n_head, n_kv, ff, vocab = 64, 16, 4, 2, 96, 50
    md = {"general.architecture": "llama", "llama.embedding_length": d, "llama.block_count": 2,
          "llama.attention.head_count": n_head, "llama.attention.head_count_kv": n_kv,
          "llama.feed_forward_length": ff, "llama.context_length": 64,
          "llama.rope.dimension_count": rope_dim, "llama.rope.freq_base": 500.0}
    m = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": m(vocab, d), "output_norm.weight": 1 + m(d),
         "output.weight": m(vocab, d)}
    if freq_factors:
        t["rope_freqs.weight"] = (1 + np.arange(rope_dim // 2)).astype(np.float32)
    for i in range(2):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": 1 + m(d), p + "attn_q.weight": m(n_head * hd, d),
                  p + "attn_k.weight": m(n_kv * hd, d), p + "attn_v.weight": m(n_kv * hd, d),
                  p + "attn_output.weight": m(d, n_head * hd), p + "ffn_norm.weight": 1 + m(d),
                  p + "ffn_gate.weight": m(ff, d), p + "ffn_up.weight": m(ff, d),
                  p + "ffn_down.weight": m(d, ff)})
    t.pop(drop, None)
    gguf.write(path, md, t)


@pytest.mark.parametrize("rope_dim,freqs", [(16, False), (8, False), (8, True)])
def test_matches_the_reference_backend_on_partial_rope(rope_dim, freqs, tmp_path):
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path, rope_dim, freqs)
    f = gguf.open(path)
    ids = list(range(3, 40))
    want = reference.ReferenceRunner(f, config_from_gguf(f), 64).prefill(ids, all_logits=True)
    got = _load(path).prefill(ids, all_logits=True)
    assert kl_rows(want, got).max() <= 1e-7


# ---------------------------------------------------------------------------
# Plugin surface: probe, plan, provider option
# ---------------------------------------------------------------------------

def test_probe_reports_version_and_providers():
    p = registry.probe("onnx")
    assert p.available and ort.__version__ in p.reason
    assert "CPUExecutionProvider" in p.devices


def test_plan_counts_packed_and_float_weights():
    f = gguf.open(conformance_path("models", "s512-llama-Q4_0.gguf"))
    c = config_from_gguf(f)
    plan = registry.plan("onnx", c, 256)
    assert isinstance(plan, MemoryPlan)
    assert plan.kv_cache == c.kv_cache_bytes(256, bytes_per_value=4)
    f32 = config_from_gguf(gguf.open(conformance_path("models", "s512-llama-F32.gguf")))
    assert plan.weights < registry.plan("onnx", f32, 256).weights / 4
    assert plan.device == 0 and plan.host_total > plan.weights


def test_unavailable_provider_is_a_clear_error():
    with pytest.raises(BackendError, match="TensorRTExecutionProvider.*available: .*CPU"):
        _load(conformance_path("models", "stories260K.gguf"),
              provider="TensorRTExecutionProvider")


def test_provider_is_reported_by_the_runner():
    r = _load(conformance_path("models", "stories260K.gguf"), provider="CPUExecutionProvider")
    assert r.info["provider"] == "CPUExecutionProvider"
    assert os.path.isfile(r.info["graph"])


# ---------------------------------------------------------------------------
# emberd --backend onnx, end to end
# ---------------------------------------------------------------------------

def test_emberd_serves_on_the_onnx_backend(cache):
    """A real emberd on onnx: llama.cpp's greedy tokens over ZeroMQ, and the same
    streamed text as the reference backend in process."""
    from ember.daemon import engine
    from tests.daemon.emberd_proc import greedy_local, model_path, start_emberd
    z = np.load(conformance_path("refs", "stories260K.p0.npz"))
    d = start_emberd("--backend", "onnx", ipc=False, timeout=120)  # the later flag wins
    rc = None
    try:
        with d.client(timeout=60) as c:
            assert c.status()["backend"] == "onnx"
            done = c.complete(tokens=z["tokens"].tolist(), max_tokens=len(z["greedy"]),
                              temperature=0.0, ignore_eos=True)
            assert done["tokens"].tolist() == z["greedy"].tolist()
            with c.generate("Once upon a time", max_tokens=40, temperature=0.0) as stream:
                text = "".join(t.text for t in stream)
        with engine.load(model_path(), backend="reference") as ref:
            assert text == greedy_local(ref, "Once upon a time", 40) and len(text) > 20
        assert any((cache / "onnx").iterdir())          # the daemon built into our cache
    finally:
        rc = d.stop()
    assert rc == 0, d.stderr()


def test_provider_from_the_environment(monkeypatch):
    """emberd and `ember run` pass no backend options: EMBER_ONNX_PROVIDER picks one."""
    path = conformance_path("models", "stories260K.gguf")
    monkeypatch.setenv("EMBER_ONNX_PROVIDER", "CUDAExecutionProvider")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert _load(path).info["provider"] == "CUDAExecutionProvider"
    else:
        with pytest.raises(BackendError, match="'CUDAExecutionProvider' is not available"):
            _load(path)
    assert _load(path, provider="CPUExecutionProvider").info["provider"] == "CPUExecutionProvider"
