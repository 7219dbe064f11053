"""Soak emberd: mixed traffic from 16 clients for N minutes; nothing lost, memory flat, clean exit.

    python3 bench/soak.py [--minutes 30] [--clients 16] [--model PATH] [--backend reference]
                          [--hup-every 60] [--seed 0] [--out bench/results/soak.md]

Starts a real emberd (loopback TCP) whose model comes from a config file, so
that SIGHUP reloads it. Each client thread loops until the time is up,
picking one scenario at a time (seeded):

  generate   a streamed generation read to its end            -> done
  complete   a non-streamed generation                         -> done
  cancel     a stream cancelled after a few tokens             -> done(cancelled) or error(cancelled)
  vanish     a stream whose socket is closed mid-way (no cancel): no reply can be counted;
             the daemon must free the engine (seen in status.recent as gone)
  slow       a DEALER that buffers one message and reads nothing for 1-4 s, then reads all
  small      ping / status / tokenize

Every request except `vanish` must get exactly one terminal reply (`busy`
counts: it is an answer). A request with none within --reply-timeout, or with
two, is *lost*. A thread samples the daemon's RSS every second (start = after
the first minute's warm-up), one sends SIGHUP every --hup-every seconds. At
the end: SIGTERM, and the exit status and time to exit. The table goes to
stdout and, with --out, to a markdown file.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from ember.daemon.client import Client, EmberError
from ember.formats import protocol

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "conformance" / "models" / "stories260K.gguf"
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day"]
SCENARIOS = [("generate", 30), ("complete", 15), ("cancel", 15), ("vanish", 10), ("slow", 10),
             ("small", 20)]
WARMUP_S = 60.0


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------

def start_daemon(model: str, backend: str, workdir: str) -> tuple[subprocess.Popen, str]:
    cfg = Path(workdir, "emberd.toml")
    cfg.write_text(f'model = "{model}"\nbackend = "{backend}"\nbind = ["tcp://127.0.0.1:*"]\n')
    log = open(Path(workdir, "stderr.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "ember.daemon.emberd", "--config", str(cfg),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=log)
    buf, end = b"", time.monotonic() + 120
    while b"\n" not in buf:
        if time.monotonic() > end or proc.poll() is not None:
            raise SystemExit(f"emberd did not start; see {log.name}")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            buf += os.read(proc.stdout.fileno(), 4096)
    return proc, buf.decode().splitlines()[0].split()[-1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------
# Scenarios: each returns an outcome name; "lost" when a reply never came (or came twice)
# ---------------------------------------------------------------------------

def terminal(c: Client, rid, timeout: float) -> dict:
    """The one terminal reply of `rid` (tokens before it are skipped)."""
    while True:
        header, _ = c.recv(rid, timeout=timeout)
        if header["op"] in ("done", "error"):
            return header


def outcome_of(header: dict) -> str:
    if header["op"] == "error":
        return f"error:{header['code']}"
    return f"done:{header['stop']}"


def run_generate(c: Client, rng: random.Random, timeout: float) -> str:
    rid = c.send("generate", prompt=rng.choice(PROMPTS), max_tokens=rng.randint(8, 200),
                 temperature=rng.choice([0.0, 0.8]), seed=rng.randint(0, 1 << 30))
    return outcome_of(terminal(c, rid, timeout))


def run_complete(c: Client, rng: random.Random, timeout: float) -> str:
    rid = c.send("generate", prompt=rng.choice(PROMPTS), max_tokens=rng.randint(8, 100),
                 stream=False)
    return outcome_of(terminal(c, rid, timeout))


def run_cancel(c: Client, rng: random.Random, timeout: float) -> str:
    rid = c.send("generate", prompt=rng.choice(PROMPTS), max_tokens=400, ignore_eos=True)
    for _ in range(rng.randint(0, 5)):
        header, _ = c.recv(rid, timeout=timeout)
        if header["op"] in ("done", "error"):
            return outcome_of(header)
    c.call("cancel", target=rid)
    return outcome_of(terminal(c, rid, timeout))


def run_vanish(endpoint: str, rng: random.Random, timeout: float) -> str:
    with Client(endpoint, timeout=timeout) as c:
        rid = c.send("generate", prompt=rng.choice(PROMPTS), max_tokens=400, ignore_eos=True)
        for _ in range(rng.randint(0, 3)):
            header, _ = c.recv(rid, timeout=timeout)
            if header["op"] in ("done", "error"):
                return outcome_of(header)
    return "vanished"


def run_slow(endpoint: str, rng: random.Random, timeout: float) -> str:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.connect(endpoint)
    try:
        sock.send_multipart([protocol.pack({"v": 1, "op": "generate", "id": 1, "max_tokens": 300,
                                            "prompt": rng.choice(PROMPTS), "ignore_eos": True})])
        time.sleep(rng.uniform(1.0, 4.0))
        terminals, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            if not sock.poll(200):
                if terminals:
                    break            # a second terminal would have come right after the first
                continue
            header = protocol.unpack_header(sock.recv_multipart()[0], protocol.CLIENT_LIMITS)
            if header["op"] in ("done", "error"):
                terminals.append(header)
        if len(terminals) != 1:
            return "lost"
        return "slow:" + outcome_of(terminals[0])
    finally:
        sock.close(linger=0)


def run_small(c: Client, rng: random.Random, timeout: float) -> str:
    op = rng.choice(["ping", "status", "tokenize"])
    fields = {"text": rng.choice(PROMPTS)} if op == "tokenize" else {}
    rid = c.send(op, **fields)
    header, _ = c.recv(rid, timeout=timeout)
    return op if header["op"] == op else outcome_of(header)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.errors: list[str] = []

    def add(self, scenario: str, outcome: str) -> None:
        with self.lock:
            self.counts[(scenario, outcome)] += 1


def client_loop(endpoint: str, seed: int, stop_at: float, timeout: float, tally: Tally) -> None:
    rng = random.Random(seed)
    names, weights = zip(*SCENARIOS)
    c = Client(endpoint, timeout=timeout)
    try:
        while time.monotonic() < stop_at:
            scenario = rng.choices(names, weights)[0]
            try:
                if scenario == "vanish":
                    outcome = run_vanish(endpoint, rng, timeout)
                elif scenario == "slow":
                    outcome = run_slow(endpoint, rng, timeout)
                else:
                    outcome = globals()[f"run_{scenario}"](c, rng, timeout)
            except EmberError as e:
                outcome = "lost" if e.code == "timeout" else f"error:{e.code}"
                if e.code == "timeout":
                    c.close()                        # replies may still come: start afresh
                    c = Client(endpoint, timeout=timeout)
            tally.add(scenario, outcome)
    finally:
        c.close()


def sampler(pid: int, stop: threading.Event, samples: list) -> None:
    t0 = time.monotonic()
    while not stop.wait(1.0):
        try:
            samples.append((time.monotonic() - t0, rss_mb(pid)))
        except OSError:
            return


def hupper(proc: subprocess.Popen, every: float, stop: threading.Event, sent: list) -> None:
    while not stop.wait(every):
        proc.send_signal(signal.SIGHUP)
        sent.append(time.monotonic())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--hup-every", type=float, default=60.0, metavar="S")
    ap.add_argument("--reply-timeout", type=float, default=60.0, metavar="S")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="ember-soak-")
    proc, endpoint = start_daemon(os.path.abspath(args.model), args.backend, workdir)
    tally, samples, hups, stop = Tally(), [], [], threading.Event()
    t_start = time.monotonic()
    stop_at = t_start + args.minutes * 60
    helpers = [threading.Thread(target=sampler, args=(proc.pid, stop, samples), daemon=True),
               threading.Thread(target=hupper, args=(proc, args.hup_every, stop, hups), daemon=True)]
    clients = [threading.Thread(target=client_loop, args=(endpoint, args.seed * 1000 + i, stop_at,
                                                          args.reply_timeout, tally), daemon=True)
               for i in range(args.clients)]
    for t in helpers + clients:
        t.start()
    for t in clients:
        t.join()
    with Client(endpoint, timeout=30) as c:
        status = c.status()
    stop.set()
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "killed after 60 s"
    report = table(args, tally, samples, hups, status, code, time.monotonic() - t_term,
                   time.monotonic() - t_start, Path(workdir, "stderr.log"))
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    lost = sum(n for (_, o), n in tally.counts.items() if o == "lost")
    return 0 if lost == 0 and code == 0 else 1


def table(args, tally, samples, hups, status, code, t_exit, elapsed, log: Path) -> str:
    warm = [mb for t, mb in samples if t >= min(WARMUP_S, elapsed / 4)]
    start, end, peak = (warm[0], warm[-1], max(warm)) if warm else (0.0, 0.0, 0.0)
    lines = [f"# emberd soak: {args.clients} clients, {elapsed / 60:.1f} min, model "
             f"{Path(args.model).name} on {args.backend}", "",
             f"command: `python3 bench/soak.py --minutes {args.minutes:g} --clients {args.clients}`",
             "", "| scenario | outcome | requests |", "|---|---|---:|"]
    for (scenario, outcome), n in sorted(tally.counts.items()):
        lines.append(f"| {scenario} | {outcome} | {n} |")
    lost = sum(n for (_, o), n in tally.counts.items() if o == "lost")
    total = sum(tally.counts.values())
    stderr = log.read_text(errors="replace") if log.exists() else ""
    lines += ["", "| measure | value |", "|---|---|",
              f"| requests | {total} |",
              f"| **lost** | **{lost}** |",
              f"| tokens served (daemon) | {status['tokens_served']} |",
              f"| requests served (daemon) | {status['requests_served']} |",
              f"| SIGHUP reloads sent | {len(hups)} |",
              f"| RSS start (after warm-up) / end / max | {start:.1f} / {end:.1f} / {peak:.1f} MB |",
              f"| RSS end vs start | {100 * (end - start) / start if start else 0:+.1f} % |",
              f"| exit status on SIGTERM | {code} (after {t_exit:.2f} s) |",
              f"| Traceback in stderr | {'yes' if 'Traceback' in stderr else 'no'} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
