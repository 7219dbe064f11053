"""CURVE security for emberd: who may connect, and refusing to listen openly.

Design. Loopback and ipc endpoints are trusted as the machine's own users
are; anything else (a LAN address, 0.0.0.0, an interface name) needs CURVE:
the server has a key pair, every client has one, and only clients whose
public key sits in the allow-list folder get in. Without keys, emberd
refuses to bind beyond loopback unless `--insecure` is passed, and then it
says loudly that anyone on the network can use it.

The allow-list is enforced by a ZAP handler (zmq.auth.ThreadAuthenticator on
the server's context). libzmq consults a ZAP handler only if one is bound —
a missing or dead handler would otherwise let every CURVE client in — so the
socket sets ZAP_DOMAIN and ZAP_ENFORCE_DOMAIN=1: no handler answering means
no connection. It fails closed.

The allow-list is read again on SIGHUP (`reload_allowed`). ZAP runs only at
a connection's handshake, so a key removed from the folder would otherwise
keep its open connections: every request also carries the key it was
authenticated with (the ZAP User-Id, the key's Z85 text), and `admit`
refuses requests whose key is no longer allowed (`unauthorized`). A revoked
client's running generation finishes; its next request is refused, and it
cannot connect again.

Key files are zmq.auth's certificate format (`ember keys` writes NAME.key
and NAME.key_secret); the client side loads the server's public key and its
own pair (`client_curve`).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ember.formats.errors import UserError
from ember.formats.protocol import ProtocolError

log = logging.getLogger("emberd")

ZAP_DOMAIN = "ember"


class SecurityError(UserError, ValueError):
    """Keys missing/unreadable, or an open bind refused."""


# ---------------------------------------------------------------------------
# Which endpoints are local
# ---------------------------------------------------------------------------

def is_local(endpoint: str) -> bool:
    """ipc/inproc, or tcp on a loopback address (127.0.0.0/8, ::1, localhost)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    if ";" in host:          # tcp://SOURCE;DEST: the bind address is the first part
        host = host.split(";", 1)[0]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False          # *, an interface name, a hostname: beyond loopback


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------

@dataclass
class ServerKeys:
    public: bytes
    secret: bytes
    allowed_dir: str


def server_keys(secret_path: str | None, allowed_dir: str | None) -> ServerKeys | None:
    """Load the server's key pair and check the allow-list folder (None: no CURVE)."""
    if not secret_path and not allowed_dir:
        return None
    if not secret_path or not allowed_dir:
        raise SecurityError("CURVE needs both the server secret key (--server-key) and the "
                            "allowed client keys folder (--allowed-clients)")
    public, secret = _load_pair(secret_path, "server")
    if not os.path.isdir(allowed_dir):
        raise SecurityError(f"allowed client keys: {allowed_dir} is not a folder")
    if not any(n.endswith(".key") for n in os.listdir(allowed_dir)):
        raise SecurityError(f"allowed client keys: {allowed_dir} holds no .key files "
                            "(copy each client's NAME.key there)")
    return ServerKeys(public, secret, os.path.abspath(allowed_dir))


def check_binds(endpoints: list[str], keys: ServerKeys | None, insecure: bool) -> list[str]:
    """Refuse open binds without keys; return the warnings to print."""
    open_eps = [e for e in endpoints if not is_local(e)]
    if not open_eps or keys is not None:
        return []
    if not insecure:
        raise SecurityError(
            f"refusing to listen beyond loopback ({', '.join(open_eps)}) without CURVE keys: "
            "make keys with `ember keys` and pass --server-key and --allowed-clients "
            "(or [security] in the config), or pass --insecure to accept anyone on the network")
    return [f"WARNING: --insecure: {', '.join(open_eps)} accepts unauthenticated, unencrypted "
            "clients from the network; anyone who can reach it can use the model"]


class Curve:
    """CURVE + ZAP on one server socket; `stop()` ends the authenticator."""

    def __init__(self, keys: ServerKeys):
        self.keys = keys
        self.auth: ThreadAuthenticator | None = None
        self.allowed: frozenset[str] = frozenset()    # Z85 public keys, as the ZAP User-Id has them

    def secure(self, sock: zmq.Socket) -> None:
        """Call before bind: start the ZAP handler and make the socket a CURVE server."""
        self.auth = ThreadAuthenticator(sock.context, log=logging.getLogger("emberd.zap"))
        self.auth.start()
        self.reload_allowed()
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        # without this, a ZAP handler that is not there means "allow": fail closed instead
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def reload_allowed(self) -> None:
        """Re-read the allow-list folder (at start and on SIGHUP): new handshakes and `admit`."""
        if self.auth is None:
            return
        self.auth.configure_curve(domain=ZAP_DOMAIN, location=self.keys.allowed_dir)
        keys = zmq.auth.load_certificates(self.keys.allowed_dir)
        self.allowed = frozenset(k.decode() for k in keys)
        log.info("CURVE allow-list: %d keys from %s", len(self.allowed), self.keys.allowed_dir)

    def admit(self, frame: zmq.Frame) -> None:
        """Refuse a request whose connection's key has left the allow-list since its handshake."""
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            user = None
        if user not in self.allowed:
            raise ProtocolError("unauthorized", "this client's key is no longer allowed on this "
                                                "daemon (ask its operator to add it again)")

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


# ---------------------------------------------------------------------------
# Keys on disk, and the client side
# ---------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def write_pair(folder: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public, share it) and NAME.key_secret (mode 0600) into folder."""
    if not _NAME.fullmatch(name) or name.startswith("."):
        raise SecurityError(f"key name {name!r}: use letters, digits, '.', '_', '-' only")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    public = os.path.join(folder, f"{name}.key")
    secret = os.path.join(folder, f"{name}.key_secret")
    for p in (public, secret):
        if os.path.exists(p):
            raise SecurityError(f"{p} exists; remove it or pick another --name")
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


def _load_pair(secret_path: str, who: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(secret_path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{who} key {secret_path}: {e}") from None
    if secret is None:
        raise SecurityError(f"{who} key {secret_path}: has no secret key "
                            "(give the .key_secret file, not the .key)")
    return public, secret


def load_public(path_or_z85: str) -> bytes:
    """A public key from a .key file, or a 40-character Z85 string."""
    if len(path_or_z85) == 40 and not os.path.exists(path_or_z85):
        return path_or_z85.encode()
    try:
        public, _ = zmq.auth.load_certificate(path_or_z85)
    except (OSError, ValueError) as e:
        raise SecurityError(f"server key {path_or_z85}: {e}") from None
    return public


def client_curve(server_key: str, client_secret: str) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) for Client(curve=...)."""
    public, secret = _load_pair(client_secret, "client")
    return load_public(server_key), public, secret


def apply_client(sock: zmq.Socket, curve: tuple[bytes, bytes, bytes]) -> None:
    """Make a client socket a CURVE client of the server whose public key is curve[0]."""
    server_public, public, secret = curve
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def client_curve_from_env(environ=None) -> tuple[bytes, bytes, bytes] | None:
    """EMBER_SERVER_KEY + EMBER_CLIENT_KEY (paths): CURVE for every `ember` client command."""
    env = os.environ if environ is None else environ
    server, client = env.get("EMBER_SERVER_KEY"), env.get("EMBER_CLIENT_KEY")
    if not server and not client:
        return None
    if not server or not client:
        raise SecurityError("set both EMBER_SERVER_KEY (the server's .key) and EMBER_CLIENT_KEY "
                            "(your .key_secret) to talk CURVE")
    return client_curve(server, client)
