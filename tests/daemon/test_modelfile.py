"""Model files emberd may map: regular and read-only, watched for shrinking, safe to rename over.

Real files in a tmp folder (a copy of stories260K made read-only, FIFOs,
devices, chown'd files when the test runs as root), real emberd processes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ember.daemon import modelfile
from tests.daemon.emberd_proc import model, model_path, start_emberd  # noqa: F401


def _readonly_copy(tmp_path, name="m.gguf"):
    dst = tmp_path / name
    shutil.copyfile(model_path(), dst)
    os.chmod(dst, 0o444)
    return dst


# ---------------------------------------------------------------------------
# check()
# ---------------------------------------------------------------------------

def test_read_only_regular_file_passes(tmp_path):
    p = _readonly_copy(tmp_path)
    c = modelfile.check(p)
    assert c.size == p.stat().st_size and c.ino == p.stat().st_ino
    link = tmp_path / "link.gguf"
    link.symlink_to(p)
    assert modelfile.check(link).ino == c.ino            # a symlink to a good file is fine


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o200])
def test_writable_by_owner_refused_when_strict_else_warned(tmp_path, mode):
    p = _readonly_copy(tmp_path)
    os.chmod(p, mode)
    with pytest.raises(modelfile.ModelFileError, match="writable by the daemon's user.*chmod a-w"):
        modelfile.check(p)
    lenient = modelfile.check(p, strict=False)
    assert "writable by the daemon's user" in lenient.warning and "serving it anyway" in lenient.warning
    assert "\n" not in lenient.warning
    assert modelfile.check(_readonly_copy(tmp_path, "ro.gguf"), strict=False).warning is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_writable_through_group_or_others(tmp_path):
    p = _readonly_copy(tmp_path)
    os.chown(p, 54321, os.getegid())
    os.chmod(p, 0o464)                                    # group-writable, our group
    with pytest.raises(modelfile.ModelFileError, match="writable"):
        modelfile.check(p)
    os.chown(p, 54321, 54321)
    os.chmod(p, 0o446)                                    # world-writable
    with pytest.raises(modelfile.ModelFileError, match="writable"):
        modelfile.check(p)
    os.chmod(p, 0o644)                                    # only its (other) owner may write
    modelfile.check(p)


def test_non_regular_files_refused(tmp_path):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo, 0o444)
    for path, kind in ((tmp_path, "a directory"), (fifo, "a FIFO"),
                       ("/dev/null", "a character device")):
        with pytest.raises(modelfile.ModelFileError, match=f"not a regular file \\({kind}\\)"):
            modelfile.check(path)
    with pytest.raises(modelfile.ModelFileError, match="no such file"):
        modelfile.check(tmp_path / "absent.gguf")


def test_recheck_catches_a_shrink_and_judges_a_replacement(tmp_path):
    p = _readonly_copy(tmp_path)
    c = modelfile.check(p)
    modelfile.recheck(c)
    os.truncate(p, c.size - 4096)                       # in place: the same inode, smaller
    with pytest.raises(modelfile.ModelFileError, match="shrank.*atomic rename"):
        modelfile.recheck(c)
    new = tmp_path / "new.gguf"
    new.write_bytes(b"x" * 10)                          # writable replacement, renamed in
    os.replace(new, p)
    with pytest.raises(modelfile.ModelFileError, match="writable"):
        modelfile.recheck(c)


def test_watch_sees_truncation_not_rename(tmp_path):
    p = _readonly_copy(tmp_path)
    c = modelfile.check(p)
    w = modelfile.Watch(c, c.size)
    try:
        other = _readonly_copy(tmp_path, "other.gguf")
        os.replace(other, p)                               # the mapped inode is untouched
        assert w.shrunk() is None
    finally:
        w.close()
    c = modelfile.check(p)
    w = modelfile.Watch(c, c.size)
    try:
        os.truncate(p, 100)
        assert "truncated under the map" in w.shrunk()
    finally:
        w.close()


# ---------------------------------------------------------------------------
# emberd
# ---------------------------------------------------------------------------

def _emberd(path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.daemon.emberd", "--model", str(path),
                           "--backend", "reference", "--bind", "tcp://127.0.0.1:*", *extra],
                          capture_output=True, text=True, timeout=60)


def test_emberd_refuses_non_regular_and_strictly_writable(tmp_path):
    w = _readonly_copy(tmp_path)
    os.chmod(w, 0o644)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo, 0o444)                 # opening it would block forever: must not be opened
    config = tmp_path / "strict.toml"
    config.write_text("strict_model_file = true\n")
    for path, extra, needle in ((w, ["--strict-model-file"], "writable by the daemon's user"),
                                (w, ["--config", str(config)], "writable by the daemon's user"),
                                (fifo, [], "not a regular file"), (tmp_path, [], "not a regular file")):
        r = _emberd(path, *extra)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_emberd_serves_a_writable_file_with_one_warning(tmp_path):
    w = _readonly_copy(tmp_path)
    os.chmod(w, 0o644)
    d = _emberd_on(w)
    try:
        with d.client() as c:
            assert c.complete("Once upon a time", max_tokens=4)["usage"]["completion_tokens"] == 4
        warnings = [ln for ln in d.stderr().splitlines() if "writable" in ln]
        assert len(warnings) == 1 and "serving it anyway" in warnings[0]
        assert f"chmod a-w {w}" in warnings[0]
    finally:
        d.stop()


def _emberd_on(path, *extra):
    """start_emberd, but on `path` instead of the conformance file."""
    import tests.daemon.emberd_proc as ep
    saved = ep.model_path
    ep.model_path = lambda: path
    try:
        return start_emberd(*extra, ipc=False)
    finally:
        ep.model_path = saved


def test_rename_over_the_model_during_generation(tmp_path, model):  # noqa: F811
    p = _readonly_copy(tmp_path)
    d = _emberd_on(p)
    try:
        with d.client() as c, c.generate("Once upon a time", max_tokens=300, temperature=0,
                                         ignore_eos=True) as s:
            first = next(s)
            other = tmp_path / "incoming.gguf"
            shutil.copyfile(model_path().with_name("stories260K-Q8_0.gguf"), other)
            os.chmod(other, 0o444)
            os.replace(other, p)                       # the new file takes the path now
            text = first.text + "".join(t.text for t in s)
        assert s.done["stop"] == "length" and s.done["usage"]["completion_tokens"] == 300
        assert text == s.done["text"] == greedy_local_ignore_eos(model, "Once upon a time", 300)
        assert d.alive()
    finally:
        d.stop()


def greedy_local_ignore_eos(m, prompt, n):
    out = None
    for out in m.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True):
        pass
    return out.text


def test_truncation_in_place_stops_the_daemon_before_sigbus(tmp_path):
    p = _readonly_copy(tmp_path)
    d = _emberd_on(p)
    try:
        with d.client() as c:
            c.call("ping")
        os.truncate(p, 1024)                  # a careless in-place edit (root ignores 0444)
        d.proc.wait(15)
        assert d.proc.returncode == 1          # a clean, reported exit — not -SIGBUS
        assert "truncated under the map" in d.stderr()
    finally:
        d.stop()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_truncation_during_a_generation_ends_it_with_model_changed(tmp_path, backend):
    """The watcher polls once a second, so a request computing at the moment
    of truncation used to die with the process (SIGBUS). Now the request gets a terminal
    `model_changed` and the daemon exits 1 on its own."""
    from ember.daemon.client import EmberError
    p = _readonly_copy(tmp_path)
    d = _emberd_on(p, "--backend", backend)
    try:
        with d.client() as c, c.generate("Once upon a time", max_tokens=400, temperature=0,
                                         ignore_eos=True) as s:
            next(s)                                # the worker waits for this token's delivery
            os.truncate(p, 1024)                   # careless in-place edit (root ignores 0444)
            with pytest.raises(EmberError) as e:
                for _ in s:
                    pass
        assert e.value.code == "model_changed", e.value
        assert "shrank under its map" in str(e.value)
        d.proc.wait(15)
        assert d.proc.returncode == 1, d.stderr()  # a clean, reported exit — not -SIGBUS
        assert "Fatal Python error" not in d.stderr()
    finally:
        d.stop()
