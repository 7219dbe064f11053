"""`emberd`: load one model and serve it over ZeroMQ.

    emberd [--model PATH] [--config FILE] [--bind ENDPOINT ...] [--backend B] [--threads N]
           [--ctx N] [--memory-budget SIZE] [--server-key K --allowed-clients DIR]

Order matters for the production side: parse flags, load the model (a bad
file is one line on stderr and exit 2, never a traceback), build the Server,
bind (a taken port is the same kind of error), print one `listening on`
line per bound endpoint to stdout (tests and scripts read it to learn a `:*`
wildcard port), then serve until SIGINT/SIGTERM, and release everything.
With --http, the OpenAI-compatible gateway (daemon/http.py) is checked
before the load, started after the ZeroMQ bind onto the same scheduler, and
prints its own `listening on http://...` line. Each stage is its own
function; daemon/service.py slots the production side
in between (config file, model-file checks and memory budget at load, CURVE
before bind, READY=1 after it, signals, drain, SIGHUP reload, watchdog).
"""
from __future__ import annotations

import argparse
import sys

from ember.daemon.log import say
from ember.daemon.log import setup as log_setup
from ember.formats import protocol
from ember.formats.errors import UserError


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from ember.daemon.cli import Parser, add_flag, add_version
    p = Parser(prog="emberd", description="ember inference daemon (ZeroMQ + msgpack)")
    add_version(p)
    add_flag(p, "--model", default=None, metavar="MODEL",
             help="GGUF model file to serve, or a name `ember models` prints (REPO/FILE, "
                  "REPO:QUANT); `demo` is the tiny model bundled with ember "
                  "(default: the default model from the cache)")
    p.add_argument("--bind", action="append", metavar="ENDPOINT",
                   help=f"ZeroMQ endpoint to listen on, repeatable (default {protocol.DEFAULT_ENDPOINT}; "
                        "tcp://HOST:* picks a free port; ipc:///path for a Unix socket)")
    p.add_argument("--backend", default="auto", help="compute backend (see `ember backends`)")
    add_flag(p, "--threads", type=int, default=None, metavar="N", help="compute threads")
    add_flag(p, "--ctx", type=int, default=None, metavar="N", help="context length (KV cache)")
    p.add_argument("--max-queue", type=int, default=protocol.Limits.max_queue, metavar="N",
                   help="requests allowed to wait; more are answered `busy`")
    p.add_argument("--max-tokens", type=int, default=protocol.Limits.max_tokens, metavar="N",
                   help="largest max_tokens a request may ask for")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    from ember.daemon import service
    service.add_arguments(p)    # --config, --memory-budget, CURVE keys, drain, reload
    from ember.daemon import http
    http.add_arguments(p)       # --http HOST:PORT, --api-key-file
    return p


class StartupError(UserError):
    """A flag or bind that stops emberd from starting; one line on stderr, exit 2."""


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------

def build_server(args, model):
    from ember.daemon.server import Server
    limits = protocol.Limits(max_queue=max(0, args.max_queue), max_tokens=max(1, args.max_tokens))
    model.tokenize("warm up")   # build the tokenizer now, not inside the first request
    return Server(model, args.bind or [protocol.DEFAULT_ENDPOINT], limits, model.info())


def http_gateway(args):
    """The HTTP gateway for --http (checked before the model loads), or None."""
    if not args.http and not args.api_key_file:
        return None              # the http extra is not even imported
    from ember.daemon import http
    return http.from_args(args)


def bind(server) -> None:
    import zmq
    try:
        server.start()
    except zmq.ZMQError as e:
        server.stop()
        raise StartupError(f"cannot bind {server.endpoints}: {e}") from None
    for ep in server.bound:
        print(f"emberd: listening on {ep}", flush=True)


# The serving loop and the worker share one GIL. When a token is ready the loop
# must get the GIL from a worker that is already computing the next one; at
# CPython's default 5 ms switch interval that is several tokens of a small
# model late (late streaming, late cancel). 0.5 ms bounds the hand-over; with
# no contention (the loop idle in poll) it costs nothing.
SWITCH_INTERVAL_S = 0.0005


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    from ember.daemon import config, service
    args = config.parse_args(build_parser(), argv)   # the --config file, flags win
    log_setup(args.log_level)       # stderr lines that can never take the daemon down
    svc = service.Service(args, argv, build_parser)   # signals + sd_notify from here on
    model = server = gateway = None
    try:
        svc.security(args.bind or [protocol.DEFAULT_ENDPOINT])
        gateway = http_gateway(args)
        model = svc.load().model    # model-file checks + memory budget (daemon/service.py)
        server = build_server(args, model)
        svc.attach(server)
        bind(server)
        if gateway is not None:
            gateway.start(server)
        svc.ready()             # READY=1: model loaded, sockets bound
    except service.Stopped:     # SIGTERM before serving: no READY=1, clean exit
        _release(server, model, svc, gateway)
        return 0
    except Exception as e:  # noqa: BLE001 - user-facing boundary
        from ember.daemon.cli import _is_user_error
        _release(server, model, svc, gateway)
        if _is_user_error(e):
            say(str(e))
            return 2
        raise
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        server.serve()
    finally:
        _release(server, model, svc, gateway)
    return svc.exit_code


def _release(server, model, svc, gateway=None) -> None:
    if gateway is not None:     # first: in-flight HTTP replies finish while the worker still runs
        gateway.stop()
    svc.stop_security()         # then: the ZAP handler's sockets would block the server's ctx.term()
    if server is not None:
        server.stop()
    if svc.loaded is not None:
        model = svc.loaded.model     # after a reload, the model now served
    if model is not None:
        model.close()
    svc.close()


if __name__ == "__main__":
    sys.exit(main())
