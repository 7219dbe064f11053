"""`ember` and `emberd` for people with llama.cpp / Ollama habits: short flags, hints,
"did you mean", --version, a fast 'no emberd' and the newline after streamed text.
Real subprocesses on the bundled demo model; a real pty for terminal behaviour."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ember.daemon.cli import version
from tests.daemon.emberd_proc import _read_endpoints
from tests.daemon.terminal import run_on_tty

EMBER = [sys.executable, "-m", "ember.daemon.cli"]
EMBERD = [sys.executable, "-m", "ember.daemon.emberd"]


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def demo_daemon():
    """`emberd -m demo` with llama.cpp's short flags, on a free loopback port."""
    proc = subprocess.Popen(EMBERD + ["-m", "demo", "-c", "256", "-t", "1",
                                      "--bind", "tcp://127.0.0.1:*"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield _read_endpoints(proc, 1, 60)[0]
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


# ---------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------

def test_version_on_both_binaries():
    assert version() != "unknown"
    assert run(EMBER + ["--version"]).stdout.strip() == f"ember {version()}"
    assert run(EMBERD + ["--version"]).stdout.strip() == f"emberd {version()}"


def test_llama_cpp_short_flags_mean_the_long_ones():
    short = run(EMBER + ["run", "-m", "demo", "-p", "Once upon a time", "-n", "12", "--temp", "0.7",
                         "-s", "7", "-c", "128", "-t", "1"])
    long = run(EMBER + ["run", "demo", "-p", "Once upon a time", "--max-tokens", "12",
                        "--temperature", "0.7", "--seed", "7", "--n-ctx", "128", "--threads", "1"])
    assert short.returncode == 0 == long.returncode, short.stderr + long.stderr
    assert short.stdout == long.stdout and short.stdout.strip()
    assert "seed 7" in short.stderr and "12 generated" in short.stderr


def test_emberd_short_flags(demo_daemon):
    from ember.daemon.client import Client
    with Client(demo_daemon) as c:
        hello = c.hello()
    assert hello["model"] == "stories260K.gguf" and hello["n_ctx"] == 256


@pytest.mark.parametrize("cmd", [EMBER + ["run", "demo", "-p", "x", "-ngl", "99"],
                                 EMBER + ["generate", "--n-gpu-layers", "99", "x"],
                                 EMBERD + ["-m", "demo", "-ngl", "99"]])
def test_gpu_layers_get_a_hint_toward_cuda(cmd):
    r = run(cmd)
    assert r.returncode == 2 and "--backend cuda" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("usage: ")


def test_a_wrong_flag_prints_the_subcommands_usage_and_a_suggestion():
    r = run(EMBER + ["generate", "--temprature", "0", "x"])
    assert r.returncode == 2
    assert r.stderr.startswith("usage: ember generate ")
    assert "did you mean --temperature?" in r.stderr
    r = run(EMBER + ["run", "demo", "-p", "x", "--max-tokns", "3"])
    assert r.stderr.startswith("usage: ember run ") and "did you mean --max-tokens?" in r.stderr
    r = run(EMBERD + ["--modle", "demo"])
    assert r.stderr.startswith("usage: emberd ") and "did you mean --model?" in r.stderr


def test_a_wrong_command_gets_a_suggestion():
    r = run(EMBER + ["generat", "x"])
    assert r.returncode == 2 and "did you mean generate?" in r.stderr


# ---------------------------------------------------------------------------
# no daemon, and the terminal
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["generate", "Once upon a time"], ["chat"]])
def test_no_daemon_fails_within_two_seconds(tmp_path, command, capsys):
    from ember.daemon import cli
    endpoint = f"ipc://{tmp_path}/nobody"
    t = time.monotonic()            # in-process: the interpreter's start-up is not ember's
    assert cli.main(command + ["--endpoint", endpoint]) == 2
    assert time.monotonic() - t < 2.0
    err = capsys.readouterr().err
    assert f"no emberd at {endpoint}" in err and "start it with `emberd --model" in err
    r = run(EMBER + command + ["--endpoint", endpoint], input="hello\n")     # as typed
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert f"no emberd at {endpoint}" in r.stderr


def test_streamed_text_ends_with_a_newline_on_a_terminal(demo_daemon):
    cmd = EMBER + ["generate", "--endpoint", demo_daemon, "-n", "16", "--temp", "0", "Once upon a time"]
    rc, shown, _ = run_on_tty(cmd, stdout=True)
    piped = run(cmd)
    assert rc == 0 == piped.returncode
    assert shown.endswith(b"\r\n") and shown.rstrip(b"\r\n") == piped.stdout.encode().replace(b"\n", b"\r\n")
    assert not piped.stdout.endswith("\n")     # into a file or pipe: exactly the completion
