"""README.md's commands work as written on a fresh clone: no ../shared beside it, no
network, an empty model cache. The clone is made with `git clone` of this checkout's
HEAD into a temporary folder; the commands run there against the installed package
(reinstalling it would only rebuild the same extension)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.emberd_proc import _read_endpoints

ROOT = Path(__file__).resolve().parents[1]
FIRST_COMMAND = "pip install -e . && emberd --model demo"


def blocks(text: str, section: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block under the `## section` heading."""
    body = re.split(r"^## ", text, flags=re.M)
    part = next(p for p in body if p.startswith(section + "\n"))
    return re.findall(r"^```(\w+)\n(.*?)^```", part, flags=re.M | re.S)


def commands(code: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in code.splitlines()
            if shlex.split(line, comments=True)]


def script(name: str) -> str:
    path = Path(sys.executable).parent / name      # the console script of this environment
    if not path.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable}")
    return str(path)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    where = tmp_path_factory.mktemp("fresh") / "ember"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True, timeout=120)
    assert not (where.parent / "shared").exists()
    return where


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")          # an empty cache: nothing pulled
    return {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
            "EMBER_HUB": "http://127.0.0.1:9"}      # and no network to pull from


def test_the_first_command_is_exactly_the_demo(clone):
    text = (clone / "README.md").read_text()
    first = blocks(text, "Set-up")[0]
    assert first == ("sh", FIRST_COMMAND + "\n")


def test_quick_start_commands_succeed_on_a_fresh_clone(clone, env):
    """emberd as README's first command starts it (plus a free port: other tests may hold
    5555); every quick-start command then runs against it, as a user would type it."""
    serve = shlex.split(FIRST_COMMAND.split("&&")[1])
    proc = subprocess.Popen([script("emberd"), *serve[1:], "--bind", "tcp://127.0.0.1:*"],
                            cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        env = {**env, "EMBER_ENDPOINT": _read_endpoints(proc, 1, 60)[0]}
        ran = 0
        for lang, code in blocks((clone / "README.md").read_text(), "Quick start"):
            for argv in commands(code) if lang == "sh" else [["python", "-c", code]]:
                exe = sys.executable if argv[0] == "python" else script(argv[0])
                r = subprocess.run([exe, *argv[1:]], cwd=clone, env=env, input="Hello\n",
                                   capture_output=True, text=True, timeout=120)
                assert r.returncode == 0 and r.stdout.strip(), (argv, r.stderr)
                assert "Traceback" not in r.stderr and "warning" not in r.stderr.lower()
                ran += 1
        assert ran >= 6          # ping, generate, chat, status, the Python example, run
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and b"warning" not in err.lower(), err
