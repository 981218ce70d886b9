"""A DICOMweb PACS client (QIDO-RS search, WADO-RS retrieve, STOW-RS store) built on `dicomweb-client`.

Searches use exact keys (Study Instance UID, Accession Number, Study Date or a date range):
Orthanc's DICOMweb plugin does not decode escaped characters in QIDO values, so wildcards are
not offered. Every HTTP failure becomes a `PacsError` naming the server (never the credentials).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pydicom.dataset import Dataset

from .errors import PacsError, safe_url
from .study import StudyImage, image_from_dataset, skip_reason

#: Seconds to wait for a PACS before calling it unreachable.
HTTP_TIMEOUT = 30.0


class DicomWebPacs:
    """One DICOMweb server.

    Args:
        url: the DICOMweb root, e.g. http://pacs:8042/dicom-web.
        username, password: HTTP Basic credentials (None for an open server).
        timeout: seconds per request.
    """

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 timeout: float = HTTP_TIMEOUT) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.name = f"DICOMweb server {safe_url(url)}"
        session = requests.Session()
        if username is not None or password is not None:
            session.auth = (username or "", password or "")
        try:
            self._client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout)
        except ValueError as exc:  # a malformed URL
            raise PacsError(f"{self.name}: not a usable DICOMweb URL ({exc}).") from None
        self._client.set_http_retry_params(retry=False)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            if code in (401, 403):
                raise PacsError(f"{self.name} refused the credentials (HTTP {code}) while trying to {what}; check "
                                f"--username and the password (--password or $MAMMO_PACS_PASSWORD).") from None
            raise PacsError(f"{self.name} answered HTTP {code} while trying to {what}.") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "is unreachable"
            raise PacsError(f"{self.name} {kind} while trying to {what}; check the URL and that the server "
                            "is running.") from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"{self.name}: request failed while trying to {what} ({type(exc).__name__}).") from None

    def check(self) -> None:
        """One cheap search, so a wrong URL or password fails before any work. Raises PacsError."""
        self._call("connect", self._client.search_for_studies, limit=1)

    def find_studies(self, *, study: str | None = None, accession: str | None = None,
                     date: str | None = None) -> list[str]:
        """Study Instance UIDs matching the one key given (a date may be a YYYYMMDD-YYYYMMDD range)."""
        filters = {k: v for k, v in (("StudyInstanceUID", study), ("AccessionNumber", accession),
                                     ("StudyDate", date)) if v}
        if len(filters) != 1:
            raise ValueError("give exactly one of study, accession or date")
        found = self._call("search for studies", self._client.search_for_studies, search_filters=filters)
        uids = []
        for item in found or []:
            value = item.get("0020000D", {}).get("Value")
            if value and value[0] not in uids:
                uids.append(str(value[0]))
        return uids

    def fetch_study(self, study_uid: str) -> tuple[list[StudyImage], list[str]]:
        """The study's for-presentation mammograms with their bytes, and one line per instance skipped.

        Reads the study's metadata (WADO-RS), keeps the images to score, then retrieves each one in
        its stored transfer syntax. An image that cannot be retrieved comes back with `error` set.
        """
        metadata = self._call("read the study's metadata", self._client.retrieve_study_metadata, study_uid)
        images, skipped = [], []
        for item in metadata or []:
            header = Dataset.from_json({k: v for k, v in item.items() if "BulkDataURI" not in v and "InlineBinary" not in v})
            reason = skip_reason(header)
            if reason:
                skipped.append(f"instance {header.get('SOPInstanceUID', '?')}: not scored ({reason}).")
                continue
            image = image_from_dataset(header)
            try:
                ds = self._call(f"retrieve {image.label}", self._client.retrieve_instance, image.study_uid,
                                image.series_uid, image.sop_uid, media_types=(("application/dicom", "*"),))
                image = image_from_dataset(ds)
            except PacsError as exc:
                image.error = str(exc)
            except Exception as exc:  # the server's copy is not a readable Part 10 file
                image.error = f"{image.label}: {self.name} sent a file that cannot be read ({type(exc).__name__})."
            images.append(image)
        images.sort(key=lambda im: (im.laterality or "~", im.view or "~", im.sop_uid))
        return images, skipped

    def store(self, datasets: Sequence[Dataset], study_uid: str) -> None:
        """Store result objects into the study (STOW-RS). Raises PacsError when the server refuses any."""
        for ds in datasets:
            # dicomweb-client writes each dataset as it is; without a preamble pydicom 3 leaves out the
            # 128-byte preamble and "DICM", and the PACS then serves files no Part 10 reader opens.
            if getattr(ds, "preamble", None) is None:
                ds.preamble = b"\0" * 128
        response = self._call("store results", self._client.store_instances, datasets=list(datasets),
                              study_instance_uid=study_uid)
        failed = (response or Dataset()).get("FailedSOPSequence")
        if failed:
            raise PacsError(f"{self.name} refused {len(failed)} of {len(datasets)} result objects "
                            f"(failure reason {failed[0].get('FailureReason', '?')}).")
