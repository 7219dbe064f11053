"""The webgpu backend: CPU-side parts everywhere, GPU parts wherever wgpu finds an adapter.

CPU: the dispatch lists (every module and entry point exists, grids within
WebGPU's 65535 workgroups a dimension, no buffer a dispatch writes bound
twice — WebGPU refuses a buffer bound read-only and writable in one dispatch), the
row pieces of tensors over the largest storage binding, the device layouts,
the memory plan.

GPU (lavapipe in CI, which sets EMBER_REQUIRE_WEBGPU=1 so that a missing
driver fails instead of skipping): each weight kind's matvec against numpy
over real quantized rows of the conformance models, at 1 token (decode's
kernel) and at token counts that leave a partial tile of the prefill
kernel; the whole runner against the reference backend (prefill, replayed
decode, truncate); split tensors giving the same logits as whole ones; the
probe naming the adapter. The conformance suites (test_conformance.py,
test_arch_conformance.py) hold the backend to llama.cpp's logits.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from ember.formats import gguf
from ember.kernels import wgsl_source
from ember.plugins import reference, webgpu
from ember.formats.model_config import UnsupportedModel, config_from_gguf
from ember.plugins.types import BackendError, CacheTooShort, ContextOverflow, TokenOutOfRange
from tests.conftest import REQUIRE_WEBGPU, absent, conformance_path

PROBE = webgpu.probe()


def _need_gpu():
    if not PROBE.available:
        absent(f"no WebGPU adapter: {PROBE.reason}", REQUIRE_WEBGPU)


@pytest.fixture(scope="module")
def model():
    """name -> (open GGUFFile, ModelConfig) of a conformance model ("arch/NAME": of arch/);
    closed at the end."""
    held = {}

    def get(name: str):
        if name not in held:
            f = gguf.open(conformance_path(*(["arch", "models"] if name.startswith("arch/") else ["models"]),
                                           f"{name.removeprefix('arch/')}.gguf"))
            held[name] = (f, config_from_gguf(f))
        return held[name]
    yield get
    for f, _ in held.values():
        f.close()


# ---------------------------------------------------------------------------
# Dispatch lists and layouts (no GPU)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("T,all_logits", [(1, False), (7, False), (9, True)])
def test_dispatches_are_well_formed(model, T, all_logits):
    f, c = model("s512-qwen2-Q4_K_M")
    lay = webgpu.layout(c, 64)
    mods = wgsl_source.all_modules()
    steps = webgpu.forward_steps(lay, T, all_logits)
    for s in steps:
        assert s.module in mods and f"fn {s.entry}(" in mods[s.module], s
        assert all(1 <= g <= webgpu.MAX_GROUPS for g in s.grid), s
        written = {int(b) for b in re.findall(r"@binding\((\d+)\) var<storage, read_write>", mods[s.module])}
        names = [n for _, n in s.bindings]
        for b, n in s.bindings:
            assert b not in written or names.count(n) == 1, f"{s.entry} writes {n} bound twice: {s.bindings}"
        assert s.uniform_binding not in [b for b, _ in s.bindings]
    # decode multiplies one token a thread, prefill eight (its last-token logits: one)
    kinds = {s.module[:3] for s in steps[:-1] if s.entry == "matvec"}
    assert kinds == ({"mv1"} if T == 1 else {"mv8"})
    assert steps[-1].module[:3] == ("mv8" if all_logits else "mv1")
    # a layer: (norm +) q|k|v, rope, attention, o, (norm +) gate|up, swiglu, down
    per_layer = [5 + len(lay.mats[f"{i}.qkv"]) + len(lay.mats[f"{i}.gate_up"]) for i in range(c.n_layer)]
    assert len(steps) == 1 + sum(per_layer) + 1


def test_projections_of_one_kind_are_stacked_into_one_dispatch(model):
    f, c = model("s512-llama-Q8_0")                   # every matrix Q8_0
    lay = webgpu.layout(c, 64)
    (qkv,), (gu,) = lay.mats["0.qkv"], lay.mats["0.gate_up"]
    assert qkv.parts == tuple(f"blk.0.attn_{r}.weight" for r in "qkv") and qkv.rows == 256 + 2 * 128
    assert gu.parts == ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight") and gu.rows == 2 * 768
    f, c = model("s512-qwen2-Q4_K_M")                 # llama.cpp's mix: v (and down) in Q6_K in some layers
    kinds = [[m.kind for m in webgpu.layout(c, 64).mats[f"{i}.qkv"]] for i in range(c.n_layer)]
    want = [[webgpu.kind_of(c.tensors[f"blk.{i}.attn_{r}.weight"].type) for r in "qkv"] for i in range(c.n_layer)]
    assert [k[-1] for k in kinds] == [w[-1] for w in want] and all(len(k) in (1, 2) for k in kinds)


def test_a_tensor_over_the_binding_limit_is_split_by_rows(model):
    f, c = model("s512-llama-Q8_0")
    row = 4 * (webgpu.row_words("q8_0", 256))
    lay = webgpu.layout(c, 64, max_binding=200 * row)
    emb = lay.mats["token_embd"]                      # 512 rows of 256
    assert [p.rows for p in emb.pieces] == [200, 200, 112]
    assert [p.row0 for p in emb.pieces] == [0, 200, 400]
    assert len({p.buf for p in emb.pieces}) == 3
    steps = webgpu.forward_steps(lay, 1)
    assert len([s for s in steps if s.entry == "embed"]) == 3          # a dispatch a piece
    assert len([s for s in steps if s.entry == "matvec" and s.bindings[0][1].startswith("output.weight")]) == 3


def test_layout_bounds_the_batch_and_the_cache_by_the_binding_limit(model):
    f, c = model("s512-llama-Q8_0")
    lay = webgpu.layout(c, 256, max_batch=512, max_binding=4 * 1536 * 100)
    assert lay.max_batch == 100                        # gate|up rows of 2 x 768 floats, the widest
    with pytest.raises(BackendError, match="use n_ctx <= 1000$"):     # rows of 4 kv heads x 32
        webgpu.layout(c, 4096, max_binding=4 * 128 * 1000)


@pytest.mark.parametrize("name,kind", [("s512-llama-Q4_0", "q4_0"), ("s512-llama-Q8_0", "q8_0"),
                                       ("s512-llama-Q4_K_S", "q4_k"), ("s512-llama-Q5_K_S", "q5_k"),
                                       ("s512-llama-Q6_K", "q6_k"), ("s512-llama-F16", "f16"),
                                       ("s512-llama-BF16", "f32"), ("s512-llama-Q4_1", "f16")])
def test_host_layout_words_per_row(model, name, kind):
    f, c = model(name)
    t = f.tensors["blk.0.ffn_down.weight"]             # (256, 768)
    assert webgpu.kind_of(t.type) == kind
    w, d = webgpu.host_layout(t)
    assert w.shape[0] == 256 and w.nbytes == 256 * 4 * webgpu.row_words(kind, 768)
    assert (d is None) == (kind not in ("q4_0", "q8_0"))
    assert webgpu.device_bytes(c.tensors[t.name]) == w.nbytes + (0 if d is None else d.nbytes)


def test_float_rows_are_padded_to_whole_units(model):
    f, c = model("stories260K")                         # n_ff 172: not a multiple of 32
    t = f.tensors["blk.0.ffn_down.weight"]              # (64, 172) F32
    w, _ = webgpu.host_layout(t)
    assert w.shape == (64, 192)
    assert np.array_equal(w[:, :172], t.numpy()) and not w[:, 172:].any()


def test_plan_counts_the_device_and_names_dequantized_types(model):
    f, c = model("s512-llama-Q4_1")
    p = webgpu.plan(c, 128, {})
    dev = webgpu.device_plan(c, 128)
    assert p.device == sum(dev.values()) and dev["kv_cache"] == c.kv_cache_bytes(128, 4)
    assert any("Q4_1 matrices are dequantized to f16" in n for n in p.notes)


def test_what_the_kernels_cannot_hold_is_refused_by_name(model):
    f, c = model("arch/s512-lfm2-F32")
    with pytest.raises(UnsupportedModel, match=r"^webgpu: head_dim 512 is above the kernels' 256$"):
        webgpu.layout(dataclasses.replace(c, head_dim=512), 64)
    with pytest.raises(UnsupportedModel, match=r"^webgpu: shortconv.l_cache 17 is outside the kernel's 1..16$"):
        webgpu.layout(dataclasses.replace(c, conv_l_cache=17), 64)


# ---------------------------------------------------------------------------
# On an adapter
# ---------------------------------------------------------------------------

def test_probe_names_the_adapter_and_its_features():
    _need_gpu()
    a = webgpu.adapter_info()
    assert PROBE.devices == [a.name] and PROBE.isa == a.api
    for feat in webgpu.FEATURES_USED:
        assert f"{feat} {'yes' if feat in a.features else 'no'}" in PROBE.reason


@pytest.fixture(scope="module")
def runners(model):
    """name -> a WebGPURunner at n_ctx 64 (the last one only stays loaded)."""
    held = {}

    def get(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in held:
            for r in held.values():
                r.close()
            held.clear()
            f, c = model(name)
            held[key] = webgpu.WebGPURunner(f, c, 64, options)
        return held[key]
    yield get
    for r in held.values():
        r.close()


@pytest.mark.parametrize("name", ["s512-llama-Q4_0", "s512-llama-Q8_0", "s512-llama-Q4_K_S",
                                  "s512-llama-Q5_K_S", "s512-llama-Q6_K", "s512-llama-F16",
                                  "s512-llama-F32", "s512-llama-Q4_1"])
@pytest.mark.parametrize("T", [1, 3, 9])
@pytest.mark.parametrize("norm", [False, True])
def test_matvec_matches_numpy(model, runners, name, T, norm):
    """ffn_down (256 x 768) times T random vectors (RMS-normalized on the way: norm), against
    numpy over the dequantized rows."""
    _need_gpu()
    f, c = model(name)
    r = runners(name)
    w = f.tensors["blk.0.ffn_down.weight"].numpy().astype(np.float64)     # (256, 768)
    x = np.random.default_rng(T).standard_normal((T, r.lay.ld_h)).astype(np.float32)
    g = np.random.default_rng(7).standard_normal(r.lay.ld_h).astype(np.float32)
    nrm = webgpu.Norm("test.g", 768, 1e-5) if norm else None
    steps = webgpu.matvec(r.lay.mats["0.down"], "h", r.lay.ld_h, "logits", c.n_vocab, 0, T, norm=nrm)
    got = r.execute(steps, {"h": x, "test.g": g}, "logits", (T, c.n_vocab))[:, :256]
    xs = x[:, :768].astype(np.float64)
    if norm:
        xs = xs / np.sqrt((xs * xs).mean(-1, keepdims=True) + 1e-5) * g[:768]
    want = xs @ w.T
    if webgpu.kind_of(f.tensors["blk.0.ffn_down.weight"].type) == "f16" and name.endswith("Q4_1"):
        want = xs @ w.astype(np.float16).astype(np.float64).T
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, f"{name} T={T}: worst relative error {err:.2e}"


@pytest.mark.parametrize("name", ["s512-qwen2-Q4_K_M", "s512-qwen3-Q4_K_M", "stories260K",
                                  "arch/s512-gemma2-Q8_0", "arch/s512-olmo2-Q8_0", "arch/s512-lfm2-Q8_0"])
def test_runner_matches_reference(model, runners, name):
    """Prefill (chunked: max_batch 4), then decode replaying the prepared dispatches."""
    _need_gpu()
    f, c = model(name)
    r = runners(name, max_batch=4)
    ref = reference.ReferenceRunner(f, c, 64)
    toks = [1, 17, 250, 3, 99, 400, 8, 5, 300, 42, 7]
    a, b = r.prefill(toks, all_logits=True), ref.prefill(toks, all_logits=True)
    assert a.shape == (len(toks), c.n_vocab) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=2e-4 * np.abs(b).max())
    for tok in (5, 77, 301):
        np.testing.assert_allclose(r.decode(tok), ref.decode(tok), atol=2e-4 * np.abs(b).max())
    assert r.n_past == len(toks) + 3
    if "conv" in c.layer_kinds:                          # lfm2 keeps only its latest conv inputs
        with pytest.raises(CacheTooShort):
            r.truncate(4)
    else:
        r.truncate(4)                                    # rows past n_past are overwritten
        ref.truncate(4)
        np.testing.assert_allclose(r.decode(9), ref.decode(9), atol=2e-4 * np.abs(b).max())
    r.reset()


def test_split_tensors_give_the_same_logits(model, runners):
    _need_gpu()
    toks = [1, 30, 200, 7]
    whole = runners("s512-llama-Q6_K").prefill(toks, all_logits=True)
    row = 4 * webgpu.row_words("q6_k", 256)
    split = runners("s512-llama-Q6_K", max_binding=200 * row)
    assert len(split.lay.mats["token_embd"].pieces) == 3
    np.testing.assert_allclose(split.prefill(toks, all_logits=True), whole, rtol=0, atol=1e-5)
    split.reset()


def test_bad_tokens_and_overflow_are_typed_errors(runners):
    _need_gpu()
    r = runners("s512-llama-Q4_0")
    r.reset()
    with pytest.raises(TokenOutOfRange):
        r.decode(r.n_vocab)
    with pytest.raises(TokenOutOfRange):
        r.prefill([1, -3])
    with pytest.raises(ContextOverflow):
        r.prefill([1] * 65)
    assert r.n_past == 0
    r.prefill([1] * 64)
    with pytest.raises(ContextOverflow):
        r.decode(1)
    r.reset()
