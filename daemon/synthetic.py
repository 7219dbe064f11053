"""Random-weight models of real shapes, to measure a board before downloading one.

Design: `write_model(shape, quant, path)` writes a GGUF file that llama.cpp
and ember both load — the real architecture, sizes and quant mix of a known
model (TinyLlama-1.1B, Qwen2-0.5B, Gemma-3-1B, LFM2-1.2B), random weights, and a valid
SentencePiece ("llama") vocabulary of the model's vocab size. It uses only
ember's own writer (ember.formats.gguf.write) and quantizer
(ember.formats.quant_blocks.quantize), and generates tensor by tensor through the
writer's callables, so at most one float32 tensor exists at a time.

The quant mixes follow llama.cpp's llama_tensor_get_type: "Q4_0"/"Q8_0"
are pure (every matrix that type); "Q4_K_M" is Q4_K with Q6_K for the output
matrix (token_embd when tied) and for attn_v / ffn_down of the layers where
use_more_bits(i, n) holds, and the K-quant fallbacks (Q4_K -> Q5_0,
Q6_K -> Q8_0) for rows not a multiple of 256.

Run as a module to write one file (``python -m ember.daemon.synthetic SHAPE
QUANT PATH``): `ember bench --synthetic` does so in a child process so that
generating the model does not count in the benchmark's peak RSS.
"""
from __future__ import annotations

import itertools
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.formats import gguf, quant_blocks
from ember.formats.errors import UserError


class SyntheticError(UserError, ValueError):
    """Unknown shape or quant mix."""


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    rms_eps: float
    qkv_bias: bool = False
    tied: bool = False
    head_dim: int = 0                   # 0: n_embd // n_head (gemma3: 256)
    # gemma3: q/k norms, post-norms, GELU; 5 sliding-window layers : 1 global (llama.cpp's default)
    sliding_window: int = 0
    rope_base_swa: float = 0.0
    # lfm2: the attention layers; every other layer is a short convolution of conv_l_cache taps
    attn_layers: tuple[int, ...] = ()
    conv_l_cache: int = 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def is_conv(self, il: int) -> bool:
        return self.arch == "lfm2" and il not in self.attn_layers


SHAPES: dict[str, Shape] = {
    # TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": Shape("llama", 2048, 22, 32, 4, 5632, 32000, 2048, 10000.0, 1e-5),
    # Qwen2-0.5B: q/k/v biases, tied embeddings, rope base 1e6
    "qwen2-0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, 151936, 32768, 1000000.0, 1e-6,
                        qkv_bias=True, tied=True),
    # Gemma-3-1B: head_dim 256 (4 x 256 > 1152), window 512, global rope base 1e6, local 1e4
    "gemma3-1b": Shape("gemma3", 1152, 26, 4, 1, 6912, 262144, 32768, 1000000.0, 1e-6, tied=True,
                       head_dim=256, sliding_window=512, rope_base_swa=10000.0),
    # LFM2-1.2B: 6 attention layers among 16; the other 10 are 3-tap short convolutions
    "lfm2-1.2b": Shape("lfm2", 2048, 16, 32, 8, 8192, 65536, 128000, 1000000.0, 1e-5, tied=True,
                       attn_layers=(2, 5, 8, 10, 12, 14), conv_l_cache=3),
    # small enough for tests: seconds to write, milliseconds per token
    "llama-tiny": Shape("llama", 256, 2, 8, 4, 768, 1024, 512, 10000.0, 1e-5),
    "gemma3-tiny": Shape("gemma3", 256, 6, 4, 1, 512, 1024, 512, 1000000.0, 1e-6, tied=True,
                         head_dim=96, sliding_window=32, rope_base_swa=10000.0),
    "lfm2-tiny": Shape("lfm2", 256, 4, 8, 4, 512, 1024, 512, 1000000.0, 1e-5, tied=True,
                       attn_layers=(1, 3), conv_l_cache=3),
}
QUANTS = ("Q4_0", "Q8_0", "Q4_K_M")
FILE_TYPE = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}   # llama_ftype ids (general.file_type)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # rows not a multiple of 256


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise SyntheticError(f"unknown synthetic shape {name!r} (known: {', '.join(SHAPES)})")
    return SHAPES[name]


# ---------------------------------------------------------------------------
# The quant mix
# ---------------------------------------------------------------------------

def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(quant: str, name: str, layer: int | None, s: Shape, cols: int) -> str:
    """GGML type of one weight matrix under the mix `quant`."""
    if quant not in QUANTS:
        raise SyntheticError(f"unknown quant {quant!r} (known: {', '.join(QUANTS)})")
    if quant != "Q4_K_M":
        t = quant
    elif name == "output.weight" or (s.tied and name == "token_embd.weight"):
        t = "Q6_K"
    elif layer is not None and name.endswith(("attn_v.weight", "ffn_down.weight")) \
            and _more_bits(layer, s.n_layer):
        t = "Q6_K"
    else:
        t = "Q4_K"
    block = quant_blocks.BLOCKS[t][0]
    return FALLBACK.get(t, "Q8_0") if cols % block else t


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------

def _attention(s: Shape, p: str, i: int) -> list:
    q, kv, d = s.n_head * s.hd, s.n_head_kv * s.hd, s.n_embd
    out = [(p + "attn_q.weight", (q, d), i), (p + "attn_k.weight", (kv, d), i),
           (p + "attn_v.weight", (kv, d), i)]
    if s.qkv_bias:
        out += [(p + "attn_q.bias", (q,), i), (p + "attn_k.bias", (kv,), i), (p + "attn_v.bias", (kv,), i)]
    if s.arch in ("gemma3", "lfm2"):   # per-head q/k RMS norms
        out += [(p + "attn_q_norm.weight", (s.hd,), i), (p + "attn_k_norm.weight", (s.hd,), i)]
    return out + [(p + "attn_output.weight", (d, q), i)]


def _shortconv(s: Shape, p: str, i: int) -> list:
    d = s.n_embd
    return [(p + "shortconv.in_proj.weight", (3 * d, d), i),
            (p + "shortconv.conv.weight", (d, s.conv_l_cache), i),
            (p + "shortconv.out_proj.weight", (d, d), i)]


def tensor_shapes(s: Shape) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, numpy shape, layer) for every tensor, in file order."""
    d = s.n_embd
    post = s.arch == "gemma3"   # post_attention_norm / post_ffw_norm
    out = [("token_embd.weight", (s.n_vocab, d), None)]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", (d,), i))
        out += _shortconv(s, p, i) if s.is_conv(i) else _attention(s, p, i)
        if post:
            out.append((p + "post_attention_norm.weight", (d,), i))
        out += [(p + "ffn_norm.weight", (d,), i),
                (p + "ffn_gate.weight", (s.n_ff, d), i), (p + "ffn_up.weight", (s.n_ff, d), i),
                (p + "ffn_down.weight", (d, s.n_ff), i)]
        if post:
            out.append((p + "post_ffw_norm.weight", (d,), i))
    out.append(("token_embd_norm.weight" if s.arch == "lfm2" else "output_norm.weight", (d,), None))
    if not s.tied:
        out.append(("output.weight", (s.n_vocab, d), None))
    return out


def is_float_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Kept F32 by llama.cpp's quantizer: 1-D tensors and lfm2's conv kernels."""
    return len(shape) == 1 or name.endswith("shortconv.conv.weight")


def _generator(name: str, shape: tuple[int, ...], ttype: str, seed: int):
    """A callable the writer runs when it reaches the tensor: one float32 tensor at a time."""
    def make():
        rng = np.random.default_rng(seed)
        if ttype == "F32" and len(shape) == 2:   # lfm2's conv kernel: a few taps per channel
            return (0.5 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        if len(shape) == 1:   # norms near 1 keep activations in range; biases small
            base = 0.0 if name.endswith(".bias") else 1.0
            return (base + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        rows_per = max(1, (1 << 22) // shape[1])   # quantize ~16 MB of float32 at a time
        parts = [quant_blocks.quantize(ttype, 0.02 * rng.standard_normal((min(rows_per, shape[0] - r), shape[1]),
                                                                   dtype=np.float32))
                 for r in range(0, shape[0], rows_per)]
        return np.concatenate(parts, axis=0)
    return make


# ---------------------------------------------------------------------------
# Vocabulary and metadata
# ---------------------------------------------------------------------------

def spm_vocab(n_vocab: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A valid llama SentencePiece vocabulary: <unk> <s> </s>, 256 byte pieces, then
    distinct word pieces. -> (tokens, scores float32, token_type int32)"""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256          # UNKNOWN, CONTROL, BYTE
    alphabet = string.ascii_lowercase + string.ascii_uppercase + string.digits
    need = n_vocab - len(tokens)
    pieces = []
    for length in itertools.count(1):
        for combo in itertools.product(alphabet, repeat=length):
            w = "".join(combo)
            pieces += ["\u2581" + w, w]     # "▁word" (word start) and "word"
            if len(pieces) >= need:
                break
        if len(pieces) >= need:
            break
    tokens += pieces[:need]
    types += [1] * need                     # NORMAL
    scores = np.zeros(n_vocab, dtype=np.float32)
    scores[259:] = -np.arange(need, dtype=np.float32)   # earlier pieces merge first
    return tokens, scores, np.array(types, dtype=np.int32)


def _arch_metadata(s: Shape) -> dict:
    a, md = s.arch, {}
    if s.head_dim:
        md[f"{a}.attention.key_length"] = md[f"{a}.attention.value_length"] = np.uint32(s.hd)
    if s.sliding_window:
        md[f"{a}.attention.sliding_window"] = np.uint32(s.sliding_window)
    if s.rope_base_swa:
        md[f"{a}.rope.freq_base_swa"] = np.float32(s.rope_base_swa)
    if a == "lfm2":   # per layer: 0 kv heads marks a convolution layer
        md[f"{a}.attention.head_count_kv"] = np.array(
            [0 if s.is_conv(i) else s.n_head_kv for i in range(s.n_layer)], dtype=np.uint32)
        md[f"{a}.shortconv.l_cache"] = np.uint32(s.conv_l_cache)
    return md


def metadata(shape_name: str, s: Shape, quant: str) -> dict:
    a = s.arch
    tokens, scores, types = spm_vocab(s.n_vocab)
    return {
        "general.architecture": a, "general.name": f"synthetic-{shape_name}-{quant}",
        "general.file_type": np.uint32(FILE_TYPE[quant]), "general.quantization_version": np.uint32(2),
        f"{a}.context_length": np.uint32(s.n_ctx_train), f"{a}.embedding_length": np.uint32(s.n_embd),
        f"{a}.block_count": np.uint32(s.n_layer), f"{a}.feed_forward_length": np.uint32(s.n_ff),
        f"{a}.attention.head_count": np.uint32(s.n_head),
        f"{a}.attention.head_count_kv": np.uint32(s.n_head_kv),
        f"{a}.attention.layer_norm_rms_epsilon": np.float32(s.rms_eps),
        f"{a}.rope.freq_base": np.float32(s.rope_base),
        f"{a}.rope.dimension_count": np.uint32(s.hd),
        **_arch_metadata(s),
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": np.uint32(1), "tokenizer.ggml.eos_token_id": np.uint32(2),
        "tokenizer.ggml.unknown_token_id": np.uint32(0),
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def write_model(shape_name: str, quant: str, path: str | os.PathLike, seed: int = 0,
                quiet: bool = False) -> Path:
    """Write the model; a tqdm bar (tensors) on stderr when it is a terminal and not quiet."""
    from tqdm import tqdm
    s = get_shape(shape_name)
    shapes = tensor_shapes(s)
    with tqdm(total=len(shapes), desc=Path(path).name, unit="tensor", file=sys.stderr,
              dynamic_ncols=True, disable=True if quiet else None) as bar:
        tensors = []
        for k, (name, shape, layer) in enumerate(shapes):
            ttype = "F32" if is_float_tensor(name, shape) else tensor_type(quant, name, layer, s, shape[1])
            make = _counted(_generator(name, shape, ttype, seed + k), bar)
            tensors.append((name, gguf.TensorData(ttype, shape, make)))
        gguf.write(path, metadata(shape_name, s, quant), tensors)
    return Path(path)


def _counted(make, bar):
    def counted():
        out = make()
        bar.update()
        return out
    return counted


def cache_dir() -> Path:
    base = os.environ.get("EMBER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ember")
    return Path(base) / "synthetic"


def cached_model(shape_name: str, quant: str) -> Path:
    """Where the synthetic model lives in the cache (it may not exist yet)."""
    get_shape(shape_name)
    if quant not in QUANTS:
        raise SyntheticError(f"unknown quant {quant!r} (known: {', '.join(QUANTS)})")
    return cache_dir() / f"{shape_name}-{quant}.gguf"


def ensure_cached(shape_name: str, quant: str) -> Path:
    """The cached synthetic model, written first (by a child process) if absent.

    The child keeps generating the weights out of the caller's peak RSS, which
    `ember bench` and the bench/ scripts measure."""
    import subprocess
    path = cached_model(shape_name, quant)
    if not path.exists():
        print(f"writing synthetic {shape_name} {quant} to {path} (once) ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "ember.daemon.synthetic", shape_name, quant,
                            str(path)])
        if r.returncode != 0:
            raise SyntheticError(f"writing the synthetic model failed (exit {r.returncode})")
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m ember.daemon.synthetic SHAPE QUANT PATH", file=sys.stderr)
        return 2
    Path(argv[2]).parent.mkdir(parents=True, exist_ok=True)
    write_model(argv[0], argv[1], argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
