"""Tokenizer throughput: ember vs llama.cpp on the same text, same run, alternating.

    python bench/tokenizer_speed.py [--rounds 5] [--llama-python /work/llamaenv/bin/python]

Text: ~200 KB of mixed UTF-8, built deterministically from what every CPython
ships: English prose (pydoc_data's topic help), Python code (argparse.py),
then seeded numbers, CJK with emoji, and whitespace runs, interleaved in
small blocks so every kind of pre-tokenizer branch runs.

For each vocabulary (llama-spm, llama-bpe, qwen2 from ../shared/conformance):
  1. speed: rounds of (ember, llama.cpp) timed alternately. ember runs with a
     cold word cache each time (cleared before the call): llama.cpp caches
     nothing, and a warm cache on a repeated text would flatter us. The warm
     figure is printed too, since the daemon keeps its cache across requests.
     llama.cpp runs in a subprocess (llama-cpp-python's venv, so ember's
     environment stays clean) that times its own call, so IPC is not
     counted against it. The ratio is against one direct llama_tokenize()
     with a large enough buffer: `Llama.tokenize()` (shown alongside) asks
     with an n_ctx_train-sized buffer first and, for a long text, tokenizes
     it a second time, which would halve llama.cpp's figure.
  2. agreement: ember's ids equal llama.cpp's ids on the bench text.
  3. scaling: ember's time for 1 KB, 100 KB and 1 MB of the mixed text and of
     a pathological text with no spaces at all (one 1 MB "word"), so a
     quadratic step would show as a 1000x jump per 10x of input.
Add-special and parse-special are off on both sides (plain text).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB_DIR = ROOT.parent / "shared" / "conformance" / "tokenizer"
VOCABS = ["llama-spm", "llama-bpe", "qwen2"]
LLAMA_CPP_MBPS = {"llama-spm": 1.5, "llama-bpe": 6.3, "qwen2": 1.7}  # measured earlier, for reference

# ---------------------------------------------------------------------------
# The text
# ---------------------------------------------------------------------------


def _prose() -> str:
    import pydoc_data.topics as topics
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _code() -> str:
    import argparse as ap
    return Path(ap.__file__).read_text()


def _numbers(rng: random.Random, n: int) -> str:
    items = []
    while sum(map(len, items)) < n:
        kind = rng.randrange(4)
        items.append(str(rng.randrange(10 ** rng.randrange(1, 12))) if kind == 0 else
                     f"{rng.uniform(-1e4, 1e4):.{rng.randrange(1, 6)}f}" if kind == 1 else
                     f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
                     if kind == 2 else f"0x{rng.randrange(1 << 32):08x}")
    return " ".join(items)


def _cjk_emoji(rng: random.Random, n_chars: int) -> str:
    emoji = "🦙🚀😶‍🌫️✅🙂👍🏽🇫🇷❤️🔥🎉"
    out = []
    for _ in range(n_chars):
        r = rng.random()
        out.append(chr(rng.randrange(0x4E00, 0x9FA5)) if r < 0.6 else
                   chr(rng.randrange(0x3041, 0x3097)) if r < 0.75 else
                   chr(rng.randrange(0xAC00, 0xD7A4)) if r < 0.85 else
                   rng.choice(emoji) if r < 0.95 else rng.choice("，。、！？ "))
    return "".join(out)


def _whitespace(rng: random.Random, n: int) -> str:
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice([" " * rng.randrange(2, 40), "\t" * rng.randrange(1, 6),
                               "\n" * rng.randrange(1, 5), " \n \t  \r\n", "word"]))
    return "".join(out)


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic mixed text of about n_bytes UTF-8 bytes (prose, code, numbers, CJK, ws)."""
    rng = random.Random(seed)
    prose, code = _prose(), _code()
    blocks, size, pp, cp = [], 0, 0, 0
    while size < n_bytes:
        kind = rng.choices(["prose", "code", "num", "cjk", "ws"], [40, 25, 10, 15, 10])[0]
        if kind == "prose":
            b = prose[pp % len(prose):pp % len(prose) + 2000]
            pp += 2000
        elif kind == "code":
            b = code[cp % len(code):cp % len(code) + 1500]
            cp += 1500
        elif kind == "num":
            b = _numbers(rng, 500)
        elif kind == "cjk":
            b = _cjk_emoji(rng, 250)
        else:
            b = _whitespace(rng, 300)
        blocks.append(b)
        size += len(b.encode())
    text = "\n".join(blocks).encode()[:n_bytes].decode("utf-8", errors="ignore")
    return text


def no_space_text(n_bytes: int) -> str:
    """One giant word: letters and digits, no whitespace (worst case for merge loops)."""
    rng = random.Random(1)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(n_bytes))[:n_bytes]


# ---------------------------------------------------------------------------
# llama.cpp in its own venv
# ---------------------------------------------------------------------------

LLAMA_WORKER = r"""
import json, sys, time
import llama_cpp
from llama_cpp import Llama
tok = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
vocab = tok._model.vocab
print(json.dumps({"ready": True}), flush=True)

def direct(data):
    # one llama_tokenize call with room for every token: llama.cpp's own cost
    out = (llama_cpp.llama_token * (len(data) + 16))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), out, len(out), False, False)
    return list(out[:n])

for line in sys.stdin:
    req = json.loads(line)
    data = open(req["path"], "rb").read()
    fn = direct if req["how"] == "direct" else (lambda d: tok.tokenize(d, add_bos=False, special=False))
    t0, c0 = time.perf_counter(), time.process_time()
    ids = fn(data)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": dt, "cpu": cpu, "ids": ids if req.get("ids") else None}), flush=True)
"""


class LlamaCpp:
    def __init__(self, python: str, vocab: Path):
        self.proc = subprocess.Popen([python, "-c", LLAMA_WORKER, str(vocab)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def tokenize(self, path: Path, want_ids: bool = False, how: str = "direct"):
        """how: 'direct' = one llama_tokenize call; 'python' = Llama.tokenize(), which
        llama-cpp-python runs twice when the text has more tokens than n_ctx_train."""
        self.proc.stdin.write(json.dumps({"path": str(path), "ids": want_ids, "how": how}) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return (r["seconds"], r["cpu"]), r["ids"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def ember_time(tok, text: str, cold: bool = True) -> tuple[tuple[float, float], list[int]]:
    """((wall s, cpu s), ids). CPU time is the steadier figure on a shared machine."""
    if cold:
        tok._model.cache.clear()
        tok._model.piece_cache.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    ids = tok.encode(text)
    return (time.perf_counter() - t0, time.process_time() - c0), ids


def bench_vocab(name: str, text: str, text_path: Path, rounds: int, llama_python: str | None) -> dict:
    from ember.formats.tokenizer import Tokenizer
    vocab = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(vocab)
    load_s = time.perf_counter() - t0
    mb = len(text.encode()) / 1e6
    llama = LlamaCpp(llama_python, vocab) if llama_python else None
    ours, theirs, theirs_py, warm = [], [], [], []
    agree = None
    for r in range(rounds):
        dt, ids = ember_time(tok, text)
        ours.append(dt)
        warm.append(ember_time(tok, text, cold=False)[0])
        if llama:
            lt, lids = llama.tokenize(text_path, want_ids=(r == 0))
            theirs.append(lt)
            theirs_py.append(llama.tokenize(text_path, how="python")[0])
            if r == 0:
                agree = lids == ids
                if not agree:
                    first = next(i for i, (a, b) in enumerate(zip(ids, lids)) if a != b) \
                        if any(a != b for a, b in zip(ids, lids)) else min(len(ids), len(lids))
                    print(f"  {name}: ids differ from llama.cpp at {first} "
                          f"(ember {ids[first:first + 5]}, llama.cpp {lids[first:first + 5]})")
    if llama:
        llama.close()
    res = {"vocab": name, "MB": mb, "load_s": load_s, "n_ids": len(ids)}
    for k, col in (("wall", 0), ("cpu", 1)):
        res[f"ember_{k}"] = mb / statistics.median(t[col] for t in ours)
        res[f"ember_warm_{k}"] = mb / statistics.median(t[col] for t in warm)
        if theirs:
            res[f"llama_{k}"] = mb / statistics.median(t[col] for t in theirs)
            res[f"ratio_{k}"] = res[f"ember_{k}"] / res[f"llama_{k}"]
            res[f"llama_py_{k}"] = mb / statistics.median(t[col] for t in theirs_py)
    res["ids_equal"] = agree
    return res


def scaling(name: str) -> list[tuple[str, int, float]]:
    from ember.formats.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(VOCAB_DIR / f"ggml-vocab-{name}.gguf")
    rows = []
    for label, make in (("mixed", mixed_text), ("no-space", no_space_text)):
        for n in (1_000, 100_000, 1_000_000):
            (_, cpu), _ = ember_time(tok, make(n))
            rows.append((label, n, cpu))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bytes", type=int, default=200_000)
    ap.add_argument("--llama-python", default="/work/llamaenv/bin/python",
                    help="python with llama-cpp-python installed ('' to skip llama.cpp)")
    ap.add_argument("--no-scaling", action="store_true")
    args = ap.parse_args(argv)
    llama_python = args.llama_python if args.llama_python and os.path.exists(args.llama_python) else None
    if not VOCAB_DIR.is_dir():
        print(f"conformance vocabularies not found at {VOCAB_DIR}", file=sys.stderr)
        return 2
    text = mixed_text(args.bytes)
    text_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ember-tok-bench-{os.getpid()}.txt"
    text_path.write_bytes(text.encode())
    try:
        print(f"text: {len(text.encode())} bytes, {len(text)} chars; rounds: {args.rounds}; "
              f"llama.cpp: {llama_python or 'skipped'}")
        print("MB/s, median of rounds; ember with a cold word cache (warm in brackets)")
        print(f"{'vocab':10} {'load s':>7} | {'ember wall':>16} {'llama.cpp':>9} {'ratio':>5} | "
              f"{'ember cpu':>16} {'llama.cpp':>9} {'ratio':>5} | ids equal")
        nan = float("nan")
        for name in VOCABS:
            r = bench_vocab(name, text, text_path, args.rounds, llama_python)
            cols = [f"{r['ember_' + k]:7.2f} ({r['ember_warm_' + k]:6.2f}) {r.get('llama_' + k, nan):9.2f} "
                    f"{r.get('ratio_' + k, nan):5.2f}" for k in ("wall", "cpu")]
            print(f"{name:10} {r['load_s']:7.2f} | {cols[0]} | {cols[1]} | {r['ids_equal']}"
                  f"   [Llama.tokenize(): {r.get('llama_py_wall', nan):.2f} wall, "
                  f"{r.get('llama_py_cpu', nan):.2f} cpu]")
    finally:
        text_path.unlink(missing_ok=True)
    if not args.no_scaling:
        print("\nscaling (ember, cold cache): cpu seconds")
        for name in VOCABS:
            rows = scaling(name)
            print(f"{name:10} " + "  ".join(f"{label} {n // 1000:>5} KB {dt:7.3f}" for label, n, dt in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
