"""Who may use a shared app, and as what: login configuration, password checks and roles.

Two roles: *reader* (Review, Metrics, their own audit entries) and *admin* (also Retrain, making a
model active, confirming an unverified model, the full audit export). Three ways to be signed in:

- **local**: the app listens on the loopback interface only and no login is configured; the one
  person at the machine is an admin, named after the operating-system user;
- **password**: `MAMMO_AUTH_FILE` names a TOML file *outside the repository* with bcrypt hashes
  (`python -m mammo_core.auth hash` makes one)::

      [users.alice]
      role = "admin"
      password_hash = "$2b$12$..."

- **oidc**: Streamlit's native `st.login` with an identity provider, configured in
  `.streamlit/secrets.toml` (`[auth]`), plus a `[mammo_roles]` table mapping e-mail patterns to
  roles (`admins = ["alice@example.org"]`, `readers = ["*@example.org"]`); anyone else is refused.

Serving to a network (`make serve`, or `MAMMO_NETWORK=1`, or a non-loopback `server.address`)
needs `password` or `oidc`: `python -m mammo_core.auth check-serve` refuses otherwise, and so
does the app itself. This module knows nothing about Streamlit; `app_pages/_shared.py` draws the
login form. See docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import fnmatch
import getpass
import os
import stat
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mammo_core.config import REPO_ROOT
from mammo_core.errors import MammoError

ROLES: tuple[str, str] = ("reader", "admin")
AUTH_FILE_ENV = "MAMMO_AUTH_FILE"
NETWORK_ENV = "MAMMO_NETWORK"
ROLES_SECTION = "mammo_roles"
#: Keys `st.login` needs in `[auth]` (client id and metadata URL may sit in a provider sub-table).
OIDC_KEYS = ("redirect_uri", "cookie_secret")
OIDC_PROVIDER_KEYS = ("client_id", "client_secret", "server_metadata_url")
#: Failed logins allowed per user name within LOCKOUT_S before that name is locked for LOCKOUT_S.
MAX_FAILURES, LOCKOUT_S = 5, 300.0


class AuthConfigError(MammoError):
    """The login configuration (users file, secrets.toml roles) is missing, unsafe or malformed."""


@dataclass(frozen=True)
class User:
    """A signed-in person: `name` goes into every audit record; `method` is local, password or oidc."""

    name: str
    role: str
    method: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def is_loopback(address: str | None) -> bool:
    """True for addresses only this machine can reach. None or "" (Streamlit's default) means every
    interface, so it is not loopback."""
    if not address:
        return False
    address = address.strip().strip("[]").lower()
    return address in ("localhost", "::1") or address.startswith("127.")


def network_requested() -> bool:
    """True when `MAMMO_NETWORK` says the app is shared (e.g. behind a reverse proxy on loopback)."""
    return os.environ.get(NETWORK_ENV, "").strip().lower() in ("1", "true", "yes")


def local_user() -> User:
    """The person at the machine in local mode (admin), named after the OS account."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "local"
    return User(name=name, role="admin", method="local")


# --- password users -----------------------------------------------------------------------------


def users_file() -> Path | None:
    value = os.environ.get(AUTH_FILE_ENV, "").strip()
    return Path(value).expanduser() if value else None


def load_users(path: str | Path) -> dict[str, dict[str, str]]:
    """Read and check the users file: {name: {"role", "password_hash"}}.

    Refused (AuthConfigError naming the file): a file inside the repository (it could be
    committed), writable by others, unreadable, not TOML, without users, with an unknown role or
    a hash that is not bcrypt.
    """
    path = Path(path).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise AuthConfigError(f"{path}: users file not found (set {AUTH_FILE_ENV} to an existing file).") from None
    if resolved.is_relative_to(REPO_ROOT.resolve()):
        raise AuthConfigError(f"{path}: the users file must live outside the repository (it could be committed); "
                              "move it, e.g. to /etc/mammo/users.toml.")
    mode = resolved.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise AuthConfigError(f"{path}: the users file is writable by other users; run chmod 600 on it.")
    try:
        data = tomllib.loads(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"{path}: cannot read the users file ({exc.__class__.__name__}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuthConfigError(f"{path}: the users file is not valid TOML ({exc}).") from None
    table = data.get("users")
    if not isinstance(table, dict) or not table:
        raise AuthConfigError(f"{path}: no [users.NAME] entries.")
    users: dict[str, dict[str, str]] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{path}: [users.{name}] is not a table.")
        role, digest = entry.get("role", "reader"), str(entry.get("password_hash", ""))
        if role not in ROLES:
            raise AuthConfigError(f"{path}: user {name!r} has role {role!r}; use one of {', '.join(ROLES)}.")
        if not digest.startswith(("$2a$", "$2b$", "$2y$")):
            raise AuthConfigError(f"{path}: user {name!r} has no bcrypt password_hash "
                                  "(make one with `python -m mammo_core.auth hash`).")
        users[str(name)] = {"role": role, "password_hash": digest}
    return users


def hash_password(password: str) -> str:
    """A bcrypt hash of `password` (cost 12), for the users file."""
    import bcrypt

    if not password:
        raise ValueError("empty password")
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=12)).decode("ascii")


# A real hash checked for unknown user names, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = b"$2b$12$A6AnTFHRLwY1AMVdKhpbK.qVV6TyCYfc6ES0CnyEKjwKPvGoUWcMe"


class LoginThrottle:
    """Counts failed logins per user name; after MAX_FAILURES within LOCKOUT_S the name is locked
    for LOCKOUT_S. Shared by every session of the server process."""

    def __init__(self, max_failures: int = MAX_FAILURES, lockout_s: float = LOCKOUT_S) -> None:
        self.max_failures, self.lockout_s = max_failures, lockout_s
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def locked(self, name: str) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(name, []) if now - t < self.lockout_s]
            self._failures[name] = recent
            return len(recent) >= self.max_failures

    def failed(self, name: str) -> None:
        with self._lock:
            self._failures.setdefault(name, []).append(time.monotonic())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


THROTTLE = LoginThrottle()


def check_password(users: Mapping[str, Mapping[str, str]], name: str, password: str,
                   throttle: LoginThrottle | None = THROTTLE) -> User | None:
    """The User when `name` and `password` match the users file, else None (also while locked out)."""
    import bcrypt

    name = (name or "").strip()
    if throttle is not None and throttle.locked(name):
        return None
    entry = users.get(name)
    digest = entry["password_hash"].encode("ascii") if entry else _DUMMY_HASH
    try:
        ok = bcrypt.checkpw((password or "").encode("utf-8"), digest)
    except ValueError:  # a malformed hash
        ok = False
    if not ok or entry is None:
        if throttle is not None:
            throttle.failed(name)
        return None
    if throttle is not None:
        throttle.succeeded(name)
    return User(name=name, role=entry["role"], method="password")


# --- OIDC (st.login) ------------------------------------------------------------------------------


def secrets_files() -> list[Path]:
    """Where Streamlit reads secrets.toml from: the user's ~/.streamlit, then the project's .streamlit."""
    return [Path.home() / ".streamlit" / "secrets.toml", REPO_ROOT / ".streamlit" / "secrets.toml"]


def read_secrets(paths: list[Path] | None = None) -> dict[str, Any]:
    """Merged secrets.toml tables (later files win), read without Streamlit; {} when there are none."""
    merged: dict[str, Any] = {}
    for path in paths if paths is not None else secrets_files():
        try:
            merged.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AuthConfigError(f"{path}: cannot read secrets ({exc.__class__.__name__}).") from None
    return merged


def oidc_configured(secrets: Mapping[str, Any]) -> bool:
    """True when secrets hold a complete `[auth]` section for st.login and a `[mammo_roles]` table."""
    section = secrets.get("auth")
    if not isinstance(section, Mapping) or not all(section.get(k) for k in OIDC_KEYS):
        return False
    providers = [section] + [v for v in section.values() if isinstance(v, Mapping)]
    if not any(all(p.get(k) for k in OIDC_PROVIDER_KEYS) for p in providers):
        return False
    roles = secrets.get(ROLES_SECTION)
    return isinstance(roles, Mapping) and bool(roles.get("admins") or roles.get("readers"))


def oidc_role(email: str | None, roles: Mapping[str, Any]) -> str | None:
    """Role of an identity-provider user from `[mammo_roles]` e-mail patterns (fnmatch, any case);
    None (refused) when no pattern matches or the provider gave no e-mail."""
    if not email:
        return None
    email = email.strip().lower()
    for role, key in (("admin", "admins"), ("reader", "readers")):
        patterns = roles.get(key) or []
        if isinstance(patterns, str):
            patterns = [patterns]
        if any(fnmatch.fnmatchcase(email, str(p).strip().lower()) for p in patterns):
            return role
    return None


def login_method(secrets: Mapping[str, Any] | None = None) -> str | None:
    """"oidc", "password" or None (no login configured). A users file that is set but unusable
    raises AuthConfigError rather than silently disabling login."""
    secrets = read_secrets() if secrets is None else secrets
    if oidc_configured(secrets):
        return "oidc"
    path = users_file()
    if path is not None:
        load_users(path)
        return "password"
    return None


def serve_check(address: str | None, secrets: Mapping[str, Any] | None = None) -> str:
    """Say how a server on `address` will authenticate; AuthConfigError when it would be shared
    without a login."""
    method = login_method(secrets)
    shared = network_requested() or not is_loopback(address)
    if method is None and shared:
        raise AuthConfigError(
            f"refusing to serve to the network (address {address or 'all interfaces'!s}) without a login: set "
            f"{AUTH_FILE_ENV} to a users file or configure [auth] and [{ROLES_SECTION}] in .streamlit/secrets.toml "
            "(see docs/DEPLOYMENT.md).")
    return method or "local"


def main(argv: list[str] | None = None) -> int:
    """`python -m mammo_core.auth hash` (reads a password, prints its bcrypt hash) or
    `python -m mammo_core.auth check-serve ADDRESS` (exit 1 when serving there would need a login)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["hash"]:
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        print(hash_password(password))
        return 0
    if args[:1] == ["check-serve"] and len(args) == 2:
        try:
            method = serve_check(args[1])
        except AuthConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"login: {method}", file=sys.stderr)
        return 0
    print("usage: python -m mammo_core.auth hash | check-serve ADDRESS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
