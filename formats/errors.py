"""UserError: the one base class of every error a user can cause and fix.

Design. A bad model file, flag, config value, request field or budget is the
user's to fix; everything else is a bug. The two must never be confused:
the CLI prints a UserError as one line and exits 2 (anything else keeps its
traceback), and emberd answers a UserError raised by a request as
`bad_request` with its message, while any other exception — a numpy
ValueError deep in the engine included — is `internal` and logged. So code
catches `UserError`, never a broad ValueError, to decide whose fault it was.

It lives here, in the lowest layer, so that formats, kernels, plugins and the
daemon all derive from the same class. Subclasses that callers also catch as
ValueError (or RuntimeError) keep that base too.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user caused and can fix; the message says what and how."""
