"""The PACS path's failure a user can cause: a server that is down, refuses the credentials or answers badly."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from mammo_core.errors import MammoError


class PacsError(MammoError):
    """A PACS is unreachable, refuses the credentials or the request, or answers with something unusable.

    Messages name the server (without credentials) and say what to do; they never hold a password
    or a patient identifier.
    """


def safe_url(url: str) -> str:
    """`url` without user:password and without a query string, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
