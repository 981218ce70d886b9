"""A DICOM storage SCP that receives images pushed by a modality or a PACS, and scores each study once
it is complete (no new image for `idle_seconds`), so a site can route studies to the tool.

Received files are kept under OUT/<Study Instance UID>/<SOP Instance UID>.dcm. A study that
receives more images after it was scored is scored again, with all its images.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .roundtrip import Pacs, StudyOutcome, score_images
from .scoring import DEFAULT_BREAST_RULE
from .study import sort_study
from .vocabulary import DEFAULT_AET

#: Seconds without a new image after which a study counts as complete.
DEFAULT_IDLE_SECONDS = 10.0
_SUCCESS, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def _safe_uid(value: Any) -> str | None:
    text = str(value or "").strip()
    return text if text and len(text) <= 64 and all(c.isdigit() or c == "." for c in text) else None


class StudyListener:
    """Storage SCP + a watcher thread that scores complete studies.

    Args:
        out_dir: where received files are kept.
        predictor: a loaded `Predictor`.
        port, host, aet: where and as whom to listen.
        idle_seconds: a study is complete after this long without a new image.
        push_to: a PACS client to store the SR and SCs into (None: score only).
        on_scored: called with each StudyOutcome (or with the PacsError text when a push fails).
    """

    def __init__(self, out_dir: str | Path, predictor: Any, *, port: int, host: str = "127.0.0.1",
                 aet: str = DEFAULT_AET, idle_seconds: float = DEFAULT_IDLE_SECONDS, push_to: Pacs | None = None,
                 rule: str = DEFAULT_BREAST_RULE, on_scored: Callable[[StudyOutcome], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.predictor, self.port, self.host, self.aet = predictor, port, host, aet
        self.idle_seconds, self.push_to, self.rule = idle_seconds, push_to, rule
        self.on_scored, self.on_error = on_scored, on_error
        self.scored_count = 0
        self._last_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None
        self._watcher: threading.Thread | None = None

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            study, sop = _safe_uid(ds.get("StudyInstanceUID")), _safe_uid(ds.get("SOPInstanceUID"))
        except Exception:  # an undecodable dataset
            return _CANNOT_UNDERSTAND
        if study is None or sop is None:
            return _CANNOT_UNDERSTAND
        folder = self.out_dir / study
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{sop}.part"
            tmp.write_bytes(event.encoded_dataset())
            os.replace(tmp, folder / f"{sop}.dcm")
        except OSError:
            return _OUT_OF_RESOURCES
        with self._lock:
            self._last_seen[study] = time.monotonic()
        return _SUCCESS

    def start(self) -> "StudyListener":
        """Start listening (returns at once). Raises OSError when the port is taken."""
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.aet)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._watcher = threading.Thread(target=self._watch, name="study-watcher", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.idle_seconds / 4)):
            now = time.monotonic()
            with self._lock:
                ready = [s for s, t in self._last_seen.items() if now - t >= self.idle_seconds]
                for study in ready:
                    del self._last_seen[study]
            for study in ready:
                self._score(study)

    def _score(self, study: str) -> None:
        images, skipped = sort_study((path.name, path.read_bytes())
                                     for path in sorted((self.out_dir / study).glob("*.dcm")))
        try:
            outcome = score_images(self.predictor, study, images, skipped, rule=self.rule, push_to=self.push_to)
        except Exception as exc:  # a failed push must not stop the listener
            from mammo_core.errors import MammoError

            # Our own errors are written to be shown; others might quote a header value, so only their type.
            text = str(exc) if isinstance(exc, MammoError) else f"scoring failed ({type(exc).__name__})"
            if self.on_error:
                self.on_error(f"study {study}: {text}")
            return
        self.scored_count += 1
        if self.on_scored:
            self.on_scored(outcome)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
