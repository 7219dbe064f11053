"""Which async HTTP library should emberd's gateway use? aiohttp vs starlette + uvicorn.

    python3 bench/http_frameworks.py [--n 2000]

Starts each candidate as its own process on loopback serving the two shapes
the gateway needs — a small JSON reply and a 16-event SSE stream — then, with
one keep-alive connection per candidate and the candidates alternated request
by request (so machine noise hits both alike), reports the median round trip
and the process's RSS after start and after the run. The decision and its
numbers are in docs/http.md.
"""
from __future__ import annotations

import argparse
import http.client
import os
import select
import statistics
import subprocess
import sys
import time

AIOHTTP_APP = r"""
import json, sys
from aiohttp import web
async def ok(request):
    return web.json_response({"object": "list", "data": [{"id": "m"}]})
async def sse(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(16):
        await resp.write(b"data: " + json.dumps({"i": i}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp
app = web.Application()
app.router.add_get("/ok", ok)
app.router.add_get("/sse", sse)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: print("ready", flush=True),
            access_log=None)
"""

STARLETTE_APP = r"""
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
async def ok(request):
    return JSONResponse({"object": "list", "data": [{"id": "m"}]})
async def sse(request):
    async def events():
        for i in range(16):
            yield b"data: " + json.dumps({"i": i}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")
app = Starlette(routes=[Route("/ok", ok), Route("/sse", sse)])
print("ready", flush=True)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(code: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if select.select([proc.stdout], [], [], 0.2)[0] and b"ready" in os.read(proc.stdout.fileno(), 99):
            break
    while time.monotonic() < end:       # uvicorn prints before it binds: wait for the port
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/ok")
            c.getresponse().read()
            c.close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(conn: http.client.HTTPConnection, path: str) -> float:
    t = time.perf_counter()
    conn.request("GET", path)
    conn.getresponse().read()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    servers = {"aiohttp": start(AIOHTTP_APP), "starlette+uvicorn": start(STARLETTE_APP)}
    try:
        rss0 = {k: rss_mib(p.pid) for k, (p, _) in servers.items()}
        conns = {k: http.client.HTTPConnection("127.0.0.1", port) for k, (_, port) in servers.items()}
        times = {(k, path): [] for k in servers for path in ("/ok", "/sse")}
        for _ in range(args.n):
            for path in ("/ok", "/sse"):
                for k, conn in conns.items():
                    times[(k, path)].append(timed(conn, path))
        print(f"{args.n} alternating requests per cell, one keep-alive connection each")
        print(f"{'library':<20} {'RSS start':>10} {'RSS end':>9} {'JSON median':>12} {'SSE-16 median':>14}")
        for k, (proc, _) in servers.items():
            ok, sse = (statistics.median(times[(k, p)]) * 1e6 for p in ("/ok", "/sse"))
            print(f"{k:<20} {rss0[k]:8.1f} M {rss_mib(proc.pid):7.1f} M {ok:9.0f} us {sse:11.0f} us")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
