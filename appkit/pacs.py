"""The Review page's PACS source: where the PACS is and who we are, from `.streamlit/secrets.toml` ([pacs]
url, username, password) or the environment (MAMMO_PACS_URL, MAMMO_PACS_USERNAME, MAMMO_PACS_PASSWORD).
Credentials are passed to the DICOMweb client only; the page shows the server without them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import streamlit as st

from mammo_core.pacs.errors import safe_url
from mammo_core.pacs.vocabulary import ENV_PASSWORD, ENV_URL, ENV_USERNAME


@dataclass(frozen=True)
class PacsSettings:
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, a log line or the page

    @property
    def shown(self) -> str:
        """The server as it may be shown: no credentials."""
        return safe_url(self.url)


def settings() -> PacsSettings | None:
    """The configured DICOMweb PACS (secrets.toml's [pacs] table first, then the environment), or None."""
    try:
        table = dict(st.secrets.get("pacs", {}) or {})
    except Exception:  # noqa: BLE001 - no secrets.toml at all is the usual case
        table = {}
    url = table.get("url") or os.environ.get(ENV_URL)
    if not url:
        return None
    return PacsSettings(url=str(url), username=table.get("username") or os.environ.get(ENV_USERNAME),
                        password=table.get("password") or os.environ.get(ENV_PASSWORD))


def client(config: PacsSettings):
    """A DICOMweb client for the configured server (`mammo_core.pacs.dicomweb.DicomWebPacs`)."""
    from mammo_core.pacs.dicomweb import DicomWebPacs

    return DicomWebPacs(config.url, username=config.username, password=config.password)
