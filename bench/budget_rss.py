"""Peak RSS of a serving emberd against its memory plan.

    python bench/budget_rss.py [--tokens 500] [--ctx 2048] [--backend cpu] [--budget SIZE]

Starts a real emberd on the synthetic TinyLlama-1.1B Q4_0 model (the same
file `ember bench --synthetic tinyllama-1.1b --quant Q4_0` writes into the
cache; copied read-only into /tmp because emberd refuses writable model
files), reads the plan from `status`, generates --tokens tokens in one
request (ignore_eos, greedy) while sampling the daemon's VmRSS, and prints
every plan line beside the measured RSS after load and the peak (VmHWM,
the kernel's high-water mark, so no spike between samples is missed).
Exit status 1 if the peak exceeds the plan.
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import time

from ember.daemon.budget import human
from ember.daemon.client import Client

COPY_DIR = "/tmp/ember-budget-bench"


def model_copy() -> str:
    from ember.daemon import synthetic
    src = str(synthetic.ensure_cached("tinyllama-1.1b", "Q4_0"))
    os.makedirs(COPY_DIR, exist_ok=True)
    dst = os.path.join(COPY_DIR, os.path.basename(src))
    if not os.path.exists(dst) or os.path.getsize(dst) != os.path.getsize(src):
        tmp = dst + ".tmp"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dst)
    return dst


def proc_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def start(model: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ember.daemon.emberd", "--model", model, "--backend", args.backend,
           "--ctx", str(args.ctx), "--bind", "tcp://127.0.0.1:*", "--max-tokens", str(args.tokens)]
    if args.budget:
        cmd += ["--memory-budget", args.budget]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    fd, buf, end = proc.stdout.fileno(), b"", time.monotonic() + 300
    while b"\n" not in buf:
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"emberd did not start (exit {proc.poll()})")
        if select.select([fd], [], [], 1)[0]:
            buf += os.read(fd, 4096)
    return proc, buf.decode().split()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--budget", help="--memory-budget for emberd (default: none, plan only)")
    args = ap.parse_args()
    model = model_copy()
    proc, ep = start(model, args)
    try:
        with Client(ep, timeout=600) as c:
            mem = c.status()["memory"]
            rss_loaded = proc_kb(proc.pid, "VmRSS")
            t0, samples = time.monotonic(), []
            with c.generate("Once upon a time", max_tokens=args.tokens, temperature=0,
                            ignore_eos=True) as s:
                for i, _ in enumerate(s):
                    if i % 10 == 0:
                        samples.append(proc_kb(proc.pid, "VmRSS"))
            dt = time.monotonic() - t0
            peak = proc_kb(proc.pid, "VmHWM")
            rss_end = proc_kb(proc.pid, "VmRSS")
            after = c.status()["memory"]
    finally:
        proc.terminate()
        proc.wait(30)
    n = s.done["usage"]["completion_tokens"]
    print(f"model     {model} on {args.backend}, n_ctx {mem['n_ctx']}, "
          f"budget {human(mem['budget']) if mem['budget'] else 'none'}")
    for k in ("weights", "kv_cache", "scratch", "runtime", "process"):
        print(f"  plan {k:<9} {human(mem[k]):>11}")
    print(f"  plan total     {human(mem['total']):>11}")
    print(f"  RSS after load {human(rss_loaded):>11}")
    print(f"  RSS max sample {human(max(samples)):>11}  ({len(samples)} samples)")
    print(f"  RSS at end     {human(rss_end):>11}")
    print(f"  peak (VmHWM)   {human(peak):>11}  = {100 * peak / mem['total']:.1f}% of the plan; "
          f"status within_plan={after['within_plan']}")
    print(f"generated {n} tokens in {dt:.1f} s ({n / dt:.2f} tok/s)")
    return 0 if peak <= mem["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
