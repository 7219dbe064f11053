"""The `onnx` backend: ONNX Runtime as the fallback that runs anywhere.

Design note. ONNX Runtime reaches hardware ember has no native kernels for
(through its execution providers: CPU, CUDA, TensorRT, CoreML, QNN, ...).
This backend turns the GGUF decoder into an ONNX graph once
(ember.plugins.onnx_graph), stores it in the model cache keyed by the GGUF's
sha256 and the graph options, and runs it with one session:

    cache dir:  $EMBER_CACHE_DIR, else $XDG_CACHE_HOME/ember, else ~/.cache/ember
    graph:      <cache>/onnx/<sha256>-b<builder>-a<accuracy>/model.onnx
    weights:    the same folder, weights.bin (external data: model.onnx stays small)

The folder is written under a temporary name and renamed into place, so a
crash mid-build never leaves a half graph that a later load would trust.
Weights are streamed into weights.bin one tensor at a time; a model over 64
MiB is built by a child process, so the daemon's own peak stays the plan's.
ORT maps the page-aligned weights and MLAS prepacks the quantized ones into
its own layout at session start (counted in the plan).

The runner owns the KV cache: float32 (n_layer, n_ctx, n_kv, hd) for K and
for V, allocated once at load. Each run feeds the cached rows [0, n_past) of
every layer (contiguous views, no copy) and writes back the T new rows the
graph returns; truncate and reset only move n_past.

Options (the `options` dict of ember_load / ember_plan):
    provider        ORT execution provider, default $EMBER_ONNX_PROVIDER or
                    "CPUExecutionProvider"; reported in runner.info and
                    `ember backends` lists the ones this onnxruntime has
    accuracy_level  MatMulNBits accuracy_level: 4 (default: activations quantized
                    to int8 per block, as llama.cpp does; ~1.5-2x faster on
                    x86, and as close to llama.cpp's logits) or 0 (float
                    activations; ORT has no fast float kernel for 8-bit
                    16-element blocks, so Q6_K tensors crawl: 0.5 vs 7 tok/s)
    allow_spinning  let ORT's idle worker threads busy-wait (default False)
    cache_dir       overrides the cache directory
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ember.formats import quant_blocks
from ember.formats.model_config import ModelConfig
from ember.kernels.rope import rope_cos_sin, rope_factors
from ember.plugins.features import require_features
from ember.plugins.hookspecs import hookimpl
from ember.plugins.types import BackendError, BackendSpec, CacheBookkeeping, MemoryPlan, Probe
from ember.plugins.types import TokenOutOfRange  # noqa: F401 - re-exported

NAME = "onnx"
DEFAULT_PROVIDER = "CPUExecutionProvider"
DEFAULT_ACCURACY = 4
ORT_RUNTIME_BYTES = 64 << 20   # ORT's own code, arenas and thread pools (measured ~40-60 MB)
BUILD_IN_PROCESS_BYTES = 64 << 20  # bigger models build in a child process (see graph_path)
# ModelConfig features (features.FEATURES) the graph computes; the rest are refused at load.
# The rope tables come from rope.rope_cos_sin, so every rope scaling is computed.
IMPLEMENTED = frozenset({"yarn", "longrope"})
PREPACK_INT8_OVERHEAD = 35     # % of packed weights that accuracy_level 4's prepacking adds


# ---------------------------------------------------------------------------
# Plugin hooks
# ---------------------------------------------------------------------------

@hookimpl
def ember_backends():
    return [BackendSpec(NAME, priority=20,
                        description="ONNX Runtime graph built from the GGUF; runs anywhere, "
                                    "reaches accelerators through execution providers",
                        features=IMPLEMENTED)]


@hookimpl
def ember_probe(backend):
    if backend != NAME:
        return None
    try:
        import onnx  # noqa: F401 - needed to build the graph
        import onnxruntime as ort
    except ImportError as e:
        return Probe(False, f"{e.name} is not installed (pip install 'ember[onnx]')")
    providers = ort.get_available_providers()
    return Probe(True, f"onnxruntime {ort.__version__}; default provider {DEFAULT_PROVIDER}",
                 devices=providers)


@hookimpl
def ember_plan(backend, config, n_ctx, options):
    if backend != NAME:
        return None
    return plan(config, n_ctx, options or {})


@hookimpl
def ember_load(backend, gguf, config, n_ctx, threads, options):
    if backend != NAME:
        return None
    return OnnxRunner(gguf, config, n_ctx, threads, options or {})


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

def plan(config: ModelConfig, n_ctx: int, options: dict) -> MemoryPlan:
    """Graph weights as ORT holds them + the mapped token_embd rows + float32 KV cache
    + one prefill batch of n_ctx tokens (attention scores included)."""
    from ember.plugins.onnx_graph import NBITS_TYPES, encoded_bytes
    graph = sum(encoded_bytes(t) for n, t in config.tensors.items()
                if n != "token_embd.weight" or config.tied_embeddings)
    packed = sum(encoded_bytes(t) for t in config.tensors.values() if t.type in NBITS_TYPES)
    if int(options.get("accuracy_level", DEFAULT_ACCURACY)) == 4:
        # MLAS prepacks 4-bit weights for its int8 kernels with per-block scales and
        # sums beside the codes: measured 992 vs 774 MiB peak on the 1.1B Q4_0 shape.
        graph += packed * PREPACK_INT8_OVERHEAD // 100
    embd = config.tensors["token_embd.weight"].nbytes
    T = n_ctx
    acts = T * (4 * config.n_embd + 3 * config.n_ff + 3 * config.n_head * config.head_dim) * 4
    scores = 2 * config.n_head * T * n_ctx * 4
    on_device = provider(options) != DEFAULT_PROVIDER
    return MemoryPlan(
        weights=embd + (0 if on_device else graph),
        kv_cache=config.kv_cache_bytes(n_ctx, bytes_per_value=4),
        scratch=acts + scores + 2 * config.n_vocab * 4,
        runtime=ORT_RUNTIME_BYTES,
        device=graph if on_device else 0,
        notes=[f"graph weights {graph} bytes ({'/'.join(NBITS_TYPES)} kept packed for "
               "MatMulNBits, other types dequantized to float32)",
               f"token_embd rows are read from the map ({embd} bytes mapped)"],
    )


# ---------------------------------------------------------------------------
# The model cache
# ---------------------------------------------------------------------------

def cache_dir(options: dict | None = None) -> Path:
    """Where built graphs live (see the module note)."""
    if options and options.get("cache_dir"):
        return Path(options["cache_dir"])
    if os.environ.get("EMBER_CACHE_DIR"):
        return Path(os.environ["EMBER_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "ember"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def graph_path(gguf, config: ModelConfig, options: dict) -> tuple[Path, bool]:
    """The cached graph of `gguf` under `options`, built if absent -> (model.onnx, built_now)."""
    from ember.plugins import onnx_graph
    acc = int(options.get("accuracy_level", DEFAULT_ACCURACY))
    if acc not in (0, 1, 2, 3, 4):
        raise BackendError(f"onnx: accuracy_level must be 0..4, got {acc}")
    key = f"{file_sha256(gguf.path)}-b{onnx_graph.BUILDER_VERSION}-a{acc}"
    final = cache_dir(options) / "onnx" / key
    if (final / "model.onnx").is_file():
        return final / "model.onnx", False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        if config.weights_bytes > BUILD_IN_PROCESS_BYTES:
            _build_in_child(gguf.path, tmp, acc)
        else:
            build_into(gguf, config, tmp, acc)
        os.replace(tmp, final)
    except OSError:
        if not (final / "model.onnx").is_file():   # lost a race to another builder: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "model.onnx", True


def build_into(gguf, config: ModelConfig, folder: Path, acc: int, bar_file=None) -> None:
    """Write model.onnx + weights.bin (+ source.json) of `gguf` into `folder`; a tqdm bar
    (layers) on bar_file (default stderr) when that is a terminal."""
    from tqdm import tqdm

    from ember.plugins import onnx_graph
    with tqdm(total=config.n_layer, desc="building ONNX graph", unit="layer", dynamic_ncols=True,
              file=bar_file or sys.stderr, disable=None) as bar:
        model = onnx_graph.build_model(gguf, config, acc, weights_path=str(folder / "weights.bin"),
                                       progress=bar.update)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    meta = {"source": os.path.abspath(gguf.path), "built": time.time(), "accuracy_level": acc}
    (folder / "source.json").write_text(json.dumps(meta))


_CHILD = """
import sys
from pathlib import Path
from ember.formats import gguf
from ember.formats.model_config import config_from_gguf
from ember.plugins import onnx
f = gguf.open(sys.argv[1])
bar_file = open(int(sys.argv[4]), "w") if sys.argv[4] != "-1" else None
onnx.build_into(f, config_from_gguf(f), Path(sys.argv[2]), int(sys.argv[3]), bar_file)
"""


def _build_in_child(path: str, folder: Path, acc: int) -> None:
    """Build in a child process: the builder's transient memory (one weight at a time
    plus Python's heap) is returned to the system when it exits, so the daemon's
    peak stays what its memory plan says."""
    # the child's stderr is captured for errors: its progress bar goes to our terminal
    bar_fd = os.dup(sys.stderr.fileno()) if sys.stderr.isatty() else -1
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, path, str(folder), str(acc), str(bar_fd)],
                           capture_output=True, text=True, pass_fds=(bar_fd,) if bar_fd >= 0 else ())
    finally:
        if bar_fd >= 0:
            os.close(bar_fd)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise BackendError(f"onnx: building the graph of {path} failed: {last}")


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

def provider(options: dict) -> str:
    """The execution provider: options["provider"], else $EMBER_ONNX_PROVIDER (so emberd
    and `ember run`, which pass no backend options, can pick one), else CPU."""
    return options.get("provider") or os.environ.get("EMBER_ONNX_PROVIDER") or DEFAULT_PROVIDER


def _session(path: Path, threads: int | None, provider: str, spin: bool):
    import onnxruntime as ort
    if provider not in ort.get_available_providers():
        raise BackendError(f"onnx: execution provider {provider!r} is not available here; "
                           f"available: {', '.join(ort.get_available_providers())}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # ORT's workers busy-wait between ops by default; on a shared edge CPU that
    # steals cycles from the compute threads themselves (measured: decode several
    # times slower on an oversubscribed 2-core box), so they sleep unless asked.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers = [provider] if provider == DEFAULT_PROVIDER else [provider, DEFAULT_PROVIDER]
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


class OnnxRunner(CacheBookkeeping):
    """ember.plugins.types.Runner over one ONNX Runtime session."""

    def __init__(self, gguf, config: ModelConfig, n_ctx: int, threads: int | None,
                 options: dict):
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        require_features(config, NAME, IMPLEMENTED)
        self.c, self.n_ctx, self.n_vocab, self.n_past = config, n_ctx, config.n_vocab, 0
        t0 = time.perf_counter()
        self.graph, built = graph_path(gguf, config, options)
        self.provider = provider(options)
        self.session = _session(self.graph, threads, self.provider,
                                bool(options.get("allow_spinning", False)))
        self.info = {"backend": NAME, "provider": self.session.get_providers()[0],
                     "graph": str(self.graph), "graph_built_now": built,
                     "accuracy_level": int(options.get("accuracy_level", DEFAULT_ACCURACY)),
                     "load_s": round(time.perf_counter() - t0, 3)}
        self.embd = gguf.tensors["token_embd.weight"]        # rows read from the map
        self._row_bytes = self.embd.nbytes // config.n_vocab
        self.cos, self.sin = rope_cos_sin(config, n_ctx, rope_factors(config, gguf, n_ctx))
        shape = (config.n_layer, n_ctx, config.n_head_kv, config.head_dim)
        self.k_cache = np.zeros(shape, np.float32)           # (layer, n_ctx, n_kv, hd)
        self.v_cache = np.zeros(shape, np.float32)
        self._gguf = gguf

    # -- the Runner protocol --------------------------------------------------

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self._check(tokens)
        rows = np.arange(len(ids)) if all_logits else np.array([len(ids) - 1])
        logits = self._run(ids, rows.astype(np.int64))
        return logits if all_logits else logits[0]

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def close(self) -> None:
        self.session = None
        self.k_cache = self.v_cache = None
        self._gguf = self.embd = None

    # -- internals ------------------------------------------------------------

    def _check(self, tokens: Sequence[int]) -> np.ndarray:
        if self.session is None:
            raise ValueError("runner is closed")
        return self.checked_tokens(tokens, np.int64)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Dequantize just the rows of `ids` from the map -> (T, n_embd) float32."""
        table = self.embd.data.reshape(self.n_vocab, self._row_bytes)
        rows = np.ascontiguousarray(table[ids])                          # (T, row_bytes)
        return np.array(quant_blocks.dequantize(self.embd.type, rows, (len(ids), self.c.n_embd)),
                        dtype=np.float32)

    def _run(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        p0, T = self.n_past, len(ids)
        S = p0 + T
        # query t (at position p0 + t) sees keys 0 .. p0 + t; -inf elsewhere
        mask = np.triu(np.full((T, S), -np.inf, np.float32), k=p0 + 1)  # (T, S)
        feed = {"x": self._embed(ids), "cos": self.cos[p0:S], "sin": self.sin[p0:S],
                "mask": mask, "rows": rows}
        for i in range(self.c.n_layer):
            feed[f"past_k.{i}"] = self.k_cache[i, :p0]                  # (p0, n_kv, hd) view
            feed[f"past_v.{i}"] = self.v_cache[i, :p0]
        outs = self.session.run(None, feed)
        for i in range(self.c.n_layer):
            self.k_cache[i, p0:S] = outs[1 + 2 * i]
            self.v_cache[i, p0:S] = outs[2 + 2 * i]
        self.n_past = S
        return np.ascontiguousarray(outs[0], dtype=np.float32)
