"""The memory budget: sizes, where the limit comes from, shrinking n_ctx, refusing.

Plans are the real backends' `ember_plan` on real conformance models; the
cgroup reader runs on a cgroup-v2-shaped tree of real files; the end-to-end
cases are real emberd processes (over budget -> breakdown and exit 2; tight
-> smaller context, said on stderr, reported by hello and status).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from ember.daemon import budget
from ember.formats import gguf
from ember.plugins import registry
from ember.formats.model_config import config_from_gguf
from tests.daemon.emberd_proc import model_path, start_emberd
from tests.formats.sparse_gguf import with_huge_array

MiB = 1 << 20


# ---------------------------------------------------------------------------
# Sizes and sources
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,n", [("1.5G", 3 << 29), ("3500M", 3500 * MiB), ("512k", 512 << 10),
                                    ("2GiB", 2 << 30), ("1 g", 1 << 30), (4096, 4096),
                                    ("4096", 4096), ("1T", 1 << 40)])
def test_parse_size(text, n):
    assert budget.parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "1.5X", "-1G", "0", 0, True, "1e9", "lots"])
def test_parse_size_refuses(bad):
    with pytest.raises(budget.BudgetError):
        budget.parse_size(bad)


def test_human():
    assert budget.human(3 << 29) == "1.50 GiB" and budget.human(512) == "512 B"
    assert budget.human(-(5 * MiB)) == "-5.00 MiB"


def _cgroup_tree(tmp_path, limits: dict[str, str]):
    """A cgroup v2 tree under tmp_path: {relative dir: memory.max text}."""
    for rel, text in limits.items():
        d = tmp_path / "fs" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(text + "\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/emberd.service\n")
    return str(proc), str(tmp_path / "fs")


def test_cgroup_limit_is_the_tightest_on_the_path(tmp_path):
    proc, root = _cgroup_tree(tmp_path, {"system.slice/emberd.service": "3670016000",
                                          "system.slice": "max", ".": "max"})
    assert budget.cgroup_memory_max(proc, root) == 3670016000
    proc, root = _cgroup_tree(tmp_path, {"system.slice/emberd.service": "max",
                                          "system.slice": str(2 << 30)})
    assert budget.cgroup_memory_max(proc, root) == 2 << 30


def test_cgroup_unlimited_or_absent(tmp_path):
    proc, root = _cgroup_tree(tmp_path, {"system.slice/emberd.service": "max"})
    assert budget.cgroup_memory_max(proc, root) is None
    assert budget.cgroup_memory_max(str(tmp_path / "nope"), root) is None
    v1 = tmp_path / "v1"
    v1.write_text("12:memory:/user.slice\n")            # cgroup v1 only: no unified line
    assert budget.cgroup_memory_max(str(v1), root) is None
    limit = budget.cgroup_memory_max()                   # this machine: whatever it is, typed
    assert limit is None or limit > 0


def test_resolve_order():
    assert budget.resolve("1G", "2G", lambda: 3) == (1 << 30, "--memory-budget")
    assert budget.resolve(None, "2G", lambda: 3) == (2 << 30, "config memory_budget")
    assert budget.resolve(None, None, lambda: 3 << 30) == (3 << 30, "cgroup memory.max")
    assert budget.resolve(None, None, lambda: None)[0] is None


# ---------------------------------------------------------------------------
# Fitting real plans
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_at():
    with gguf.open(model_path()) as f:
        cfg = config_from_gguf(f)
    return lambda n: registry.plan("reference", cfg, n, {})


def test_unlimited_keeps_the_context(plan_at):
    fit = budget.fit(plan_at, 2048, 256, None, "none", process=40 * MiB)
    assert fit.n_ctx == 2048 and not fit.shrunk and fit.total == plan_at(2048).host_total + 40 * MiB


def test_tight_budget_shrinks_to_the_largest_fitting_context(plan_at):
    process = 40 * MiB
    limit = plan_at(1000).host_total + process
    fit = budget.fit(plan_at, 2048, 256, limit, "test", process=process)
    assert 256 <= fit.n_ctx <= 1000 and fit.n_ctx % budget.CTX_STEP == 0
    assert fit.total <= limit
    assert plan_at(fit.n_ctx + budget.CTX_STEP).host_total + process > limit
    assert "shrunk from 2048 to" in fit.messages[0]


def test_over_budget_lists_every_line(plan_at):
    process = 40 * MiB
    floor = plan_at(256)
    limit = floor.host_total + process - 12345
    with pytest.raises(budget.OverBudget) as e:
        budget.fit(plan_at, 2048, 256, limit, "test", process=process)
    text = str(e.value)
    for line in ("weights", "kv_cache", "scratch", "runtime", "process", "total", "budget",
                 "over by"):
        assert line in text
    assert "n_ctx=256" in text and budget.human(12345) in text


def test_beside_charges_the_old_model(plan_at):
    process = 40 * MiB
    limit = plan_at(2048).host_total + process + 1
    assert budget.fit(plan_at, 2048, 256, limit, "t", process).n_ctx == 2048
    with pytest.raises(budget.OverBudget, match="old_model"):
        budget.fit(plan_at, 2048, 2048, limit, "t", process, beside=plan_at(2048).host_total)


# ---------------------------------------------------------------------------
# emberd with a budget
# ---------------------------------------------------------------------------

def test_emberd_refuses_over_budget_with_breakdown():
    r = subprocess.run([sys.executable, "-m", "ember.daemon.emberd", "--model", str(model_path()),
                        "--backend", "reference", "--bind", "tcp://127.0.0.1:*",
                        "--memory-budget", "8M"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert "Traceback" not in r.stderr
    assert "does not fit the memory budget (--memory-budget)" in r.stderr
    for line in ("weights", "kv_cache", "scratch", "process", "over by"):
        assert line in r.stderr


def test_emberd_tight_budget_shrinks_and_says_so():
    # what the process holds before a load varies a little by machine: measure it in a probe run
    probe = start_emberd("--ctx", "2048", ipc=False)
    try:
        with probe.client() as c:
            mem = c.status()["memory"]
    finally:
        probe.stop()
    assert mem["n_ctx"] == 2048 and mem["budget"] is None
    limit = mem["total"] - (mem["kv_cache"] + mem["scratch"]) // 2
    d = start_emberd("--ctx", "2048", "--memory-budget", str(limit), ipc=False)
    try:
        with d.client() as c:
            hello, st = c.call("hello")[0], c.status()
        assert "context shrunk from 2048 to" in d.stderr()
        assert 256 <= hello["n_ctx"] < 2048
        m = st["memory"]
        assert m["n_ctx"] == hello["n_ctx"] and m["budget"] == limit
        assert m["budget_source"] == "--memory-budget" and m["total"] <= limit
        assert st["rss_bytes"] > 0 and m["peak_rss_bytes"] > 0
    finally:
        d.stop()


# ---------------------------------------------------------------------------
# A file whose metadata is bigger than the budget
# ---------------------------------------------------------------------------
# stories260K plus a 100M-element uint8 array in a sparse file: the array
# used to become a 100M-item list at open, before the plan (~900 MB of RSS
# under --memory-budget 150M, and a 1 s stall of the loop during `load`).

HUGE_N = 100_000_000


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_emberd_serves_a_file_with_a_huge_metadata_array_within_its_budget(tmp_path):
    huge = tmp_path / "huge.gguf"
    with_huge_array(model_path(), huge, HUGE_N)
    d = start_emberd("--model", str(huge), "--memory-budget", "150M", ipc=False)
    try:
        with d.client() as c:
            c.ping()
            done = c.complete("Once upon a time", max_tokens=8, temperature=0.0)
            assert done["op"] == "done" and len(done["tokens"]) == 8
            assert c.status()["memory"]["budget"] == 150 * MiB
        assert peak_rss(d.proc.pid) < 150 * MiB, d.stderr()
    finally:
        d.stop()


def test_loading_a_huge_metadata_array_does_not_stall_pings(tmp_path):
    cache = tmp_path / "cache"
    (cache / "test--huge").mkdir(parents=True)
    with_huge_array(model_path(), cache / "test--huge" / "huge.gguf", HUGE_N)
    d = start_emberd("--allow-load", "--cache-dir", str(cache), ipc=False)
    rtts, loading = [], threading.Event()

    def pinger():
        with d.client() as c:
            while loading.is_set():
                rtts.append(c.ping())

    try:
        with d.client(timeout=120) as c:
            loading.set()
            t = threading.Thread(target=pinger)
            t.start()
            try:
                reply = c.call("load", model="huge.gguf")[0]
            finally:
                loading.clear()
                t.join()
            assert reply["model"] == "huge.gguf"
            assert c.complete("Once", max_tokens=4, temperature=0.0)["op"] == "done"
        assert len(rtts) >= 3 and max(rtts) < 0.5, f"slowest ping {max(rtts):.3f} s of {len(rtts)}"
        assert peak_rss(d.proc.pid) < 150 * MiB
    finally:
        d.stop()
