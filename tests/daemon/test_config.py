"""emberd's TOML config: the example loads, flags win, bad files are one line and exit 2."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ember.daemon import config, emberd
from tests.daemon.emberd_proc import model_path, start_emberd

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "emberd.toml"


def _parse(argv):
    return config.parse_args(emberd.build_parser(), argv)


def test_example_loads_and_agrees_with_the_schema():
    settings = config.load(EXAMPLE)
    assert settings["bind"] == ["ipc:///run/emberd/emberd.sock", "tcp://127.0.0.1:5555"]
    assert settings["model"] is None and settings["threads"] is None   # "" / 0 = defaults
    assert settings["max_queue"] == 16 and settings["drain_timeout"] == 10.0
    text = EXAMPLE.read_text()
    for section, key in config.SCHEMA:      # every key is documented there (maybe commented)
        assert re.search(rf"^#? ?{key} = ", text, re.M), key
        if section:
            assert f"[{section}]" in text


def test_example_drives_the_parser():
    args = _parse(["--config", str(EXAMPLE)])
    assert args.ctx == 4096 and args.min_ctx == 512 and args.max_queue == 16
    assert args.bind == ["ipc:///run/emberd/emberd.sock", "tcp://127.0.0.1:5555"]
    assert args.insecure is False and args.allow_load is False and args.model is None
    assert "ctx" in args.config_keys


def test_flags_override_the_file(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text('ctx = 128\nbind = ["tcp://127.0.0.1:1"]\nmemory_budget = "1G"\n'
                 '[scheduler]\nqueue_size = 3\n')
    args = _parse(["--config", str(f), "--ctx", "64", "--bind", "tcp://127.0.0.1:2"])
    assert args.ctx == 64 and args.bind == ["tcp://127.0.0.1:2"] and args.max_queue == 3
    assert args.memory_budget == "1G"
    args = _parse(["--config", str(f)])
    assert args.ctx == 128 and args.bind == ["tcp://127.0.0.1:1"]
    assert _parse([]).ctx is None            # no file: built-in defaults


def test_draft_keys_reach_the_parser(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text('draft = "prompt-lookup"\ndraft_max = 8\n')
    args = _parse(["--config", str(f)])
    assert args.draft == "prompt-lookup" and args.draft_max == 8
    assert _parse(["--config", str(f), "--draft", "small.gguf"]).draft == "small.gguf"


@pytest.mark.parametrize("text,needle", [
    ("draft_max = 0\n", "draft_max must be a positive integer"),
    ("draft = 1\n", "draft must be"),
    ("ctx = 0\n", "ctx must be a positive integer"),
    ("ctx = true\n", "ctx must be"),
    ("threads = -1\n", "threads must be"),
    ("bind = \"tcp://x\"\n", "bind must be a list"),
    ("bind = [1]\n", "bind must be a list"),
    ("colour = 1\n", "unknown key 'colour'"),
    ("[scheduler]\nmax_queue = 1\n", "unknown key '[scheduler] max_queue'"),
    ("[sched]\nx = 1\n", "unknown section [sched]"),
    ("ctx = \n", "not valid TOML"),
    ("insecure = true\n", "unknown key 'insecure'"),     # it lives in [security]
])
def test_bad_files_are_named(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=re.escape(needle)):
        config.load(f)


def test_emberd_bad_config_is_one_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("ctx = 'big'\n")
    for cfg in (f, tmp_path / "missing.toml"):
        r = subprocess.run([sys.executable, "-m", "ember.daemon.emberd", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(cfg) in r.stderr


def test_emberd_runs_from_a_config_file(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text(f'model = "{model_path()}"\nbackend = "reference"\nctx = 96\n'
                 f'[scheduler]\nmax_tokens = 7\n')
    d = start_emberd("--config", str(f), ipc=False)
    try:
        with d.client() as c:
            hello = c.call("hello")[0]
        assert hello["n_ctx"] == 96 and hello["limits"]["max_tokens"] == 7
    finally:
        d.stop()


def test_http_settings_come_from_the_file(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text('http = "127.0.0.1:8080"\n[security]\napi_key_file = "/etc/ember/http.keys"\n')
    args = _parse(["--config", str(f)])
    assert args.http == "127.0.0.1:8080" and args.api_key_file == "/etc/ember/http.keys"
    assert _parse(["--config", str(f), "--http", "127.0.0.1:9"]).http == "127.0.0.1:9"
    assert _parse([]).http is None                          # off by default
