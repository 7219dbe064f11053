"""The memory budget: does a model fit, at which context, and if not, why not.

Design. Memory is planned before a single weight is touched. The backend's
`ember_plan` hook says what a model costs at a context length (weights, KV
cache, scratch, its own runtime); the daemon adds what the process already
holds (the interpreter, numpy, ZeroMQ: measured RSS before the load) and
compares the total with the budget, which comes from, in order: the
`--memory-budget` flag, the config file, the cgroup's memory.max (systemd's
MemoryMax=), or nothing (no limit, the plan is still reported).

The KV cache is the only part that scales with n_ctx, and every backend's
plan is monotonic in n_ctx, so when the requested context does not fit,
`fit()` binary-searches the largest context that does, down to a floor
(`min_ctx`), and says so. Below the floor it refuses with `OverBudget`, whose
message lists every line of the plan and by how much the total is over — a
user error (one line per part on stderr, non-zero exit, no traceback).

The prompt cache (daemon/promptcache.py) keeps up to N host copies of the
KV cache, so it is planned as N x kv_cache (`with_prompt_cache`, the
`prompt_cache` line). With `--cache-slots N` the slots are part of the plan
that must fit (the context shrinks for them like for the KV cache); by
default they take only what the budget leaves once the model fits at its
context, up to promptcache.DEFAULT_SLOTS (`size_prompt_cache`): context
first, reuse second.

A reload puts two models in memory for a moment (the new one loads beside
the old), so `fit_beside()` charges the old model's plan too.

Receive buffers. libzmq hands a multipart message over only once all of it
has arrived, and bounds each frame (ZMQ_MAXMSGSIZE) but not how many frames
one message has: a hostile peer can make it buffer gigabytes before the
server sees frame one. No socket option bounds that, so with a budget the
daemon bounds its private memory instead: `cap_private()` sets RLIMIT_DATA
to what the process maps now plus what the budget has left. When a frame
would cross it, libzmq's allocation fails and it drops that connection
(nothing else): the message is freed and every other client carries on.
The plan charges `receive` for the legitimate case — a few maximal requests
arriving at once — so the cap never bites a request the protocol allows.
RLIMIT_DATA counts address space, not resident pages, and runtimes reserve
more than they touch (OpenBLAS maps a 32 MiB buffer per BLAS thread on first
use), so the cap carries `VIRTUAL_SLACK` beyond the budget: a hostile message
is stopped at budget + slack instead of at the machine's memory.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable

from ember.formats.errors import UserError
from ember.plugins.types import MemoryPlan

CTX_STEP = 64                      # shrunk contexts are multiples of this
CGROUP_ROOT = "/sys/fs/cgroup"


class OverBudget(UserError):
    """The model does not fit the memory budget; the message is the breakdown."""


class BudgetError(UserError, ValueError):
    """A budget value that cannot be read (bad size text, negative)."""


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text) -> int:
    """'1.5G', '3500M', '512k', '2GiB', 4096 -> bytes (binary units, like systemd's MemoryMax)."""
    if isinstance(text, bool):
        raise BudgetError(f"memory budget must be a size like 1.5G, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise BudgetError(f"memory budget must be a size like 1.5G or 3500M, got {text!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise BudgetError(f"memory budget must be positive, got {text!r}")
    return int(value)


def human(n: int) -> str:
    """Bytes as a short binary-unit string: 1.50 GiB, 12.0 MiB, 512 B."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


# ---------------------------------------------------------------------------
# Where the budget comes from
# ---------------------------------------------------------------------------

def cgroup_memory_max(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> int | None:
    """The tightest memory.max on the path from this process's cgroup (v2) to the root.

    systemd puts MemoryMax= there; "max" means unlimited. A limit on a parent
    slice binds too, so every level up to the root is read.
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rel = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    if rel is None:
        return None
    limits = []
    path = os.path.normpath(os.path.join(root, rel.lstrip("/")))
    while path.startswith(os.path.normpath(root)):
        limits.append(_read_limit(os.path.join(path, "memory.max")))
        if path == os.path.normpath(root):
            break
        path = os.path.dirname(path)
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _read_limit(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # "max" = unlimited


def resolve(flag=None, config=None, cgroup: Callable[[], int | None] = cgroup_memory_max):
    """(bytes or None, where it came from): flag, then config, then the cgroup."""
    if flag not in (None, ""):
        return parse_size(flag), "--memory-budget"
    if config not in (None, ""):
        return parse_size(config), "config memory_budget"
    limit = cgroup()
    if limit is not None:
        return limit, "cgroup memory.max"
    return None, "none (no --memory-budget, config or cgroup limit)"


# ---------------------------------------------------------------------------
# The plan against the budget
# ---------------------------------------------------------------------------

@dataclass
class Fit:
    """A plan that fits (or an unlimited one), for the n_ctx that will be loaded."""

    n_ctx: int
    plan: MemoryPlan
    process: int                       # RSS the process held before the load
    budget: int | None
    source: str
    requested_ctx: int
    beside: int = 0                    # an old model kept loaded during a swap
    receive: int = 0                   # requests libzmq may hold while they arrive (cap_private)
    messages: list[str] = field(default_factory=list)
    cache_slots: int = 0               # prompt-cache slots planned (plan.prompt_cache)

    @property
    def total(self) -> int:
        return self.plan.host_total + self.process + self.receive

    @property
    def shrunk(self) -> bool:
        return self.n_ctx < self.requested_ctx

    def lines(self) -> list[tuple[str, int]]:
        return plan_lines(self.plan, self.process, self.beside, self.receive)

    def to_wire(self) -> dict:
        """The plan as `status` reports it (bytes; budget None = unlimited)."""
        return {"budget": self.budget, "budget_source": self.source, "n_ctx": self.n_ctx,
                "requested_ctx": self.requested_ctx, "total": self.total,
                "cache_slots": self.cache_slots,
                **{name: n for name, n in self.lines()}, "device": self.plan.device}


def plan_lines(plan: MemoryPlan, process: int, beside: int = 0,
               receive: int = 0) -> list[tuple[str, int]]:
    rows = [("weights", plan.weights), ("kv_cache", plan.kv_cache),
            ("prompt_cache", plan.prompt_cache), ("scratch", plan.scratch),
            ("runtime", plan.runtime), ("process", process)]
    if receive:
        rows.append(("receive", receive))
    if beside:
        rows.append(("old_model", beside))
    return rows


def breakdown(plan: MemoryPlan, process: int, budget: int, n_ctx: int, beside: int = 0,
              receive: int = 0) -> str:
    """Every line of the plan, the total, and by how much it is over."""
    rows = plan_lines(plan, process, beside, receive)
    total = sum(n for _, n in rows)
    width = max(len(k) for k, _ in rows)
    out = [f"  {k:<{width}}  {human(n):>11}" for k, n in rows]
    out.append(f"  {'total':<{width}}  {human(total):>11}  (n_ctx {n_ctx})")
    out.append(f"  {'budget':<{width}}  {human(budget):>11}")
    out.append(f"  {'over by':<{width}}  {human(total - budget):>11}")
    return "\n".join(out)


def fit(plan_at: Callable[[int], MemoryPlan], n_ctx: int, min_ctx: int, budget: int | None,
        source: str = "", process: int = 0, beside: int = 0, receive: int = 0) -> Fit:
    """The largest context <= n_ctx (and >= min_ctx) whose plan fits, or OverBudget."""
    min_ctx = max(1, min(min_ctx, n_ctx))
    plan = plan_at(n_ctx)
    result = Fit(n_ctx, plan, process, budget, source, n_ctx, beside, receive)
    extra = process + beside + receive
    if budget is None or plan.host_total + extra <= budget:
        return result
    floor = plan_at(min_ctx)
    if floor.host_total + extra > budget:
        why = (f"the model does not fit the memory budget ({source}) even at the smallest "
               f"context n_ctx={min_ctx}" if min_ctx < n_ctx else
               f"the model does not fit the memory budget ({source}) at n_ctx={n_ctx}")
        raise OverBudget(f"{why}:\n{breakdown(floor, process, budget, min_ctx, beside, receive)}\n"
                         f"  raise the budget, lower --min-ctx, or use a smaller quant")
    ctx = _largest_fitting(plan_at, min_ctx, n_ctx, budget, extra)
    result.n_ctx, result.plan = ctx, plan_at(ctx)
    result.messages.append(f"memory budget {human(budget)} ({source}): context shrunk from "
                           f"{n_ctx} to {ctx} tokens (plan {human(result.total + beside)})")
    return result


def with_prompt_cache(plan: MemoryPlan, slots: int) -> MemoryPlan:
    """The plan plus `slots` prompt-cache entries, each at most one whole KV cache."""
    if slots <= 0:
        return replace(plan, prompt_cache=0)
    return replace(plan, prompt_cache=slots * plan.kv_cache,
                   notes=[*plan.notes, f"prompt cache: {slots} slots of at most the KV cache "
                                       f"({human(plan.kv_cache)}) each, filled as requests end"])


def size_prompt_cache(result: Fit, most: int) -> Fit:
    """Default slots: up to `most`, within what the budget leaves once the model fits."""
    per = result.plan.kv_cache
    if result.budget is None or per == 0:
        slots = most
    else:
        free = result.budget - result.total - result.beside
        slots = max(0, min(most, free // per))
        if slots < most:
            result.messages.append(f"memory budget {human(result.budget)} ({result.source}) leaves "
                                   f"room for {slots} prompt-cache slots of {human(per)}")
    result.plan, result.cache_slots = with_prompt_cache(result.plan, slots), slots
    return result


def _largest_fitting(plan_at, lo: int, hi: int, budget: int, extra: int) -> int:
    """Binary search: plan_at(lo) fits, plan_at(hi) does not; KV grows with n_ctx."""
    floor = lo

    def fits(c):
        return plan_at(c).host_total + extra <= budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    stepped = lo // CTX_STEP * CTX_STEP   # a tidy size, unless that falls below the floor
    return stepped if stepped >= floor else lo


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size now (Linux /proc/self/statm); 0 where /proc is unavailable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: /proc's VmHWM, which belongs to this
    address space alone; without /proc, getrusage's ru_maxrss (which also keeps the
    peak of the process this one was forked from)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int | None:
    """One "kB" field of /proc/self/status in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


VIRTUAL_SLACK = max(256 << 20, (32 << 20) * (os.cpu_count() or 1))


def private_bytes() -> int:
    """Private writable memory mapped now (VmData: what RLIMIT_DATA counts); 0 without /proc."""
    return _status_bytes("VmData") or 0


def cap_private(budget: int | None) -> int | None:
    """Cap private memory at what is mapped now plus the budget's headroom and the slack.

    Call it with the model loaded (its KV cache and scratch already mapped) and again after a
    swap. File-backed weights count in the budget (RSS) but not in RLIMIT_DATA, hence the
    headroom is measured against RSS. Without a budget nothing is capped. Returns the cap.
    """
    import resource
    if budget is None:
        return None
    private = private_bytes()
    if private == 0:                                  # no /proc: nothing to measure against
        return None
    cap = private + max(0, budget - rss_bytes()) + VIRTUAL_SLACK
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return cap


def release_free_memory() -> None:
    """Hand free heap pages back to the kernel (glibc's malloc_trim; elsewhere nothing).

    Worker, tokenizer and reload threads each allocate in their own malloc arena, and freed
    chunks stay resident in them; the daemon calls this when it goes idle so that RSS after a
    burst or a reload returns to where it was instead of creeping up (bench/soak.py).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    try:
        return ctypes.CDLL(None).malloc_trim     # the process's own libc
    except (OSError, AttributeError):            # not glibc (musl, macOS): nothing to do
        return None
