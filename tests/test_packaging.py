"""The installed distribution: one `ember` namespace, a built Cython extension, two console scripts.

Each check runs in a fresh interpreter started with -I from an empty
directory, so it sees what site-packages provides — not this checkout
through the current directory (pytest's rootdir is on sys.path).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("daemon", "formats", "kernels", "plugins")


def installed(tmp_path, code: str) -> dict:
    """Run `code` (which prints one JSON document) as an installed user would."""
    proc = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_no_top_level_code_folder_is_importable(tmp_path):
    found = installed(tmp_path, """
        import importlib.util, json
        out = {}
        for name in %r:
            spec = importlib.util.find_spec(name)
            out[name] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations)))
        print(json.dumps(out))
    """ % (CODE_FOLDERS,))
    for name, origin in found.items():
        # another project's module of that name (e.g. python-daemon) is not ours to judge;
        # one that resolves into this checkout means we leaked a top-level package
        assert origin is None or str(ROOT) not in origin, f"`import {name}` resolves to {origin}"


def test_distribution_files_hold_no_top_level_code_folder(tmp_path):
    info = installed(tmp_path, """
        import importlib.metadata as md, json
        d = md.distribution("ember")
        print(json.dumps({"files": [str(f) for f in d.files or []],
                          "top_level": (d.read_text("top_level.txt") or "").split(),
                          "where": str(d.locate_file(""))}))
    """)
    assert str(ROOT) not in info["where"], "the distribution was found in the checkout, not installed"
    assert info["files"], "the installed distribution lists no files"
    tops = {f.split("/")[0].removesuffix(".py") for f in info["files"]}
    assert not tops & set(CODE_FOLDERS), sorted(tops & set(CODE_FOLDERS))
    assert not set(info["top_level"]) & set(CODE_FOLDERS), info["top_level"]


def test_ember_is_a_namespace_package(tmp_path):
    info = installed(tmp_path, """
        import json
        import ember, ember.daemon, ember.formats, ember.kernels, ember.plugins
        print(json.dumps({"file": getattr(ember, "__file__", None),
                          "path_type": type(ember.__path__).__name__,
                          "subs": {m.__name__: m.__file__ for m in
                                   (ember.daemon, ember.formats, ember.kernels, ember.plugins)}}))
    """)
    assert info["file"] is None and info["path_type"] == "_NamespacePath"
    assert not (ROOT / "ember" / "__init__.py").exists()
    for name, path in info["subs"].items():
        assert path.endswith("__init__.py"), (name, path)


def test_cython_extension_imports_and_runs(tmp_path):
    info = installed(tmp_path, """
        import importlib.machinery, json, struct
        import numpy as np
        from ember.kernels import _native
        Q8_0 = 8
        block = struct.pack("<e", 0.5) + bytes(np.arange(-16, 16, dtype=np.int8).view(np.uint8))
        y = np.zeros(32, np.float32)
        _native.dequantize_row(Q8_0, np.frombuffer(block, np.uint8), y)
        print(json.dumps({"file": _native.__file__, "suffixes": importlib.machinery.EXTENSION_SUFFIXES,
                          "elems": _native.block_elems(Q8_0), "bytes": _native.block_bytes(Q8_0),
                          "y": y.tolist()}))
    """)
    assert any(info["file"].endswith(s) for s in info["suffixes"]), info["file"]
    assert (info["elems"], info["bytes"]) == (32, 34)
    assert info["y"] == [0.5 * q for q in range(-16, 16)]


@pytest.mark.parametrize("script, target", [("ember", "ember.daemon.cli:main"),
                                            ("emberd", "ember.daemon.emberd:main")])
def test_console_scripts_exist(tmp_path, script, target):
    info = installed(tmp_path, """
        import importlib.metadata as md, json
        eps = {e.name: e.value for e in md.distribution("ember").entry_points
               if e.group == "console_scripts"}
        loaded = {n: callable(e.load()) for n, e in
                  ((e.name, e) for e in md.distribution("ember").entry_points) if n in eps}
        print(json.dumps({"eps": eps, "callable": loaded}))
    """)
    assert info["eps"][script] == target and info["callable"][script]
    bindir = Path(sys.executable).parent
    exe = bindir / script if (bindir / script).exists() else shutil.which(script)
    assert exe and os.access(exe, os.X_OK), f"console script {script} not installed"


def test_ember_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "ember"
    exe = str(exe) if exe.exists() else shutil.which("ember")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and "inspect" in proc.stdout and "quantize" in proc.stdout
