"""Backend discovery and choice: built-ins, a third-party entry point, broken plugins.

The third-party package lives in tests/plugins/fakeplugin. It is "installed"
the way pip would: a dist-info folder with an entry_points.txt for the group
``ember.backends`` in a temporary site directory, put on PYTHONPATH of a fresh
interpreter, so discovery goes through importlib.metadata for real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.formats.errors import UserError
from ember.plugins import registry
from ember.plugins.types import BackendError, BackendSpec, Probe

FAKEPLUGIN = Path(__file__).resolve().parent / "fakeplugin"
ENTRY_POINTS = """\
[ember.backends]
fake = ember_fakeplugin
badimport = ember_badimport
"""


# ---------------------------------------------------------------------------
# Built-in backends, in process
# ---------------------------------------------------------------------------

def test_builtins_are_plugins_and_reference_runs_anywhere():
    names = [s.name for s in registry.backends()]
    assert "reference" in names
    assert all(isinstance(s, BackendSpec) for s in registry.backends())
    prios = [s.priority for s in registry.backends()]
    assert prios == sorted(prios, reverse=True)
    assert registry.probe("reference").available


def test_statuses_have_a_reason_for_every_backend():
    rows = registry.statuses()
    assert rows and all(r.reason for r in rows)
    assert {r.name for r in rows} == {s.name for s in registry.backends()}


def test_auto_picks_highest_priority_available_and_says_why():
    name, why = registry.choose("auto")
    best = max((s for s in registry.backends() if registry.probe(s.name).available),
               key=lambda s: s.priority)
    assert name == best.name
    assert "auto" in why and str(best.priority) in why


def test_unknown_backend_is_a_clear_error_naming_what_is_available():
    with pytest.raises(BackendError) as e:
        registry.choose("tpu9000")
    msg = str(e.value)
    assert "'tpu9000'" in msg and "reference" in msg and "available" in msg
    assert isinstance(e.value, UserError)


def test_probe_of_undeclared_name_is_unavailable_not_an_exception():
    p = registry.probe("nothing-declares-this")
    assert isinstance(p, Probe) and not p.available


# ---------------------------------------------------------------------------
# A third-party package through an entry point, in a fresh interpreter
# ---------------------------------------------------------------------------

@pytest.fixture
def plugin_env(tmp_path):
    """Environment with the fake package installed via a dist-info entry point."""
    dist = tmp_path / "ember_fakeplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ember-fakeplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(FAKEPLUGIN),
                                         env.get("PYTHONPATH", "")])
    return env


def _ember(env, *args):
    return subprocess.run([sys.executable, "-m", "ember.daemon.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_third_party_backend_is_discovered_and_listed(plugin_env):
    r = _ember(plugin_env, "backends", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {b["name"]: b for b in doc["backends"]}
    assert rows["fake"]["available"] and rows["fake"]["isa"] == "fake-isa"
    assert rows["fake"]["devices"] == ["fake0"] and rows["fake"]["plugin"] == "fake"
    assert rows["reference"]["available"]  # built-ins still there


def test_probe_that_raises_is_unavailable_with_its_error_and_ember_starts(plugin_env):
    r = _ember(plugin_env, "backends", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    broken = {b["name"]: b for b in doc["backends"]}["broken"]
    assert not broken["available"]
    assert "RuntimeError" in broken["reason"] and "libfake.so.1" in broken["reason"]
    # a package that fails at import is reported too, and nothing else is lost
    err = next(v for k, v in doc["load_errors"].items() if k.startswith("badimport"))
    assert "libbadaccel.so" in err


def test_table_output_lists_every_backend_with_reasons(plugin_env):
    r = _ember(plugin_env, "backends")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["BACKEND", "PRIORITY", "AVAILABLE"]
    broken = next(line for line in lines if line.startswith("broken"))
    assert " no " in broken and "libfake.so.1" in broken
    assert any(line.startswith("fake ") and " yes " in line for line in lines)
    assert any("badimport" in line and "failed to load" in line for line in lines)


def test_third_party_backend_is_selectable_by_name(plugin_env):
    r = _ember(plugin_env, "backends", "--backend", "fake")
    assert r.returncode == 0, r.stderr
    assert "--backend fake -> fake: asked for by name" in r.stdout


def test_asking_for_the_broken_backend_is_one_line_naming_what_is_available(plugin_env):
    r = _ember(plugin_env, "backends", "--backend", "broken")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "'broken' is not available here" in err and "libfake.so.1" in err
    assert "available: " in err and "fake" in err and "reference" in err


def test_asking_for_an_absent_backend_is_one_line(plugin_env):
    r = _ember(plugin_env, "backends", "--backend", "metal")
    assert r.returncode == 2
    assert "unknown backend 'metal'" in r.stderr and "Traceback" not in r.stderr


def test_third_party_runner_loads_a_real_gguf(plugin_env, tmp_path):
    """choose + load through the registry, on a GGUF written by ember's own writer."""
    from ember.formats import gguf
    path = tmp_path / "tiny.gguf"
    md = {"general.architecture": "llama", "llama.embedding_length": 8,
          "llama.block_count": 1, "llama.attention.head_count": 2,
          "llama.feed_forward_length": 16, "llama.context_length": 32}
    gguf.write(path, md, {"token_embd.weight": np.zeros((11, 8), np.float32)})
    script = f"""
from ember.formats import gguf
from ember.formats.model_config import config_from_gguf
from ember.plugins import registry
name, why = registry.choose("fake")
f = gguf.open({str(path)!r})
r = registry.load(name, f, config_from_gguf(f), n_ctx=8)
print(int(r.prefill([3, 4]).argmax()), int(r.decode(10).argmax()), r.n_past)
"""
    out = subprocess.run([sys.executable, "-c", script], env=plugin_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "0", "3"]  # counting model: t -> t+1 mod 11


def test_auto_passes_over_a_backend_that_lacks_a_models_feature(plugin_env, tmp_path):
    """`plain` (priority 1000) declares no arch features: auto takes it for a plain llama
    file, and for the bert encoder goes on to the best backend that computes encoders."""
    from ember.formats import gguf
    from tests.conftest import conformance_path
    path = tmp_path / "tiny.gguf"
    gguf.write(path, {"general.architecture": "llama", "llama.embedding_length": 8,
                      "llama.block_count": 1, "llama.attention.head_count": 2,
                      "llama.feed_forward_length": 16, "llama.context_length": 32},
               {"token_embd.weight": np.zeros((11, 8), np.float32)})
    bge = conformance_path("arch", "models", "bge-bert-F32.gguf")
    script = f"""
import json
from ember.formats import gguf
from ember.plugins import registry
from ember.formats import model_config as arch
out = []
for p in ({str(path)!r}, {str(bge)!r}):
    with gguf.open(p) as f:
        out.append(registry.choose("auto", arch.config_from_gguf(f)))
out.append(registry.choose("auto"))
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", script], env=plugin_env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (plain, _), (name, why), (blind, _) = json.loads(run.stdout)
    assert plain == blind == "plain"
    with_encoders = [s.name for s in registry.backends() if registry.probe(s.name).available
                     and (s.features is None or "encoder" in s.features)]
    assert name == with_encoders[0]
    assert "skipped plain (no bert bidirectional encoder (embeddings))" in why


def test_emberd_starts_and_serves_a_third_party_backend_beside_a_broken_one(plugin_env,
                                                                             monkeypatch):
    """The broken plugins are installed too; emberd still starts, on `fake` by name."""
    from tests.daemon.emberd_proc import start_emberd
    monkeypatch.setenv("PYTHONPATH", plugin_env["PYTHONPATH"])   # the daemon inherits it
    d = start_emberd("--backend", "fake", ipc=False, timeout=120)
    rc = None
    try:
        with d.client(timeout=30) as c:
            assert c.status()["backend"] == "fake"
            done = c.complete(tokens=[1, 10], max_tokens=5, temperature=0.0, ignore_eos=True)
            assert done["tokens"].tolist() == [11, 12, 13, 14, 15]   # the counting model
    finally:
        rc = d.stop()
    assert rc == 0, d.stderr()
