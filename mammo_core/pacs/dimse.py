"""A DIMSE PACS client for PACS without DICOMweb, built on `pynetdicom`: C-ECHO, C-FIND, C-GET and C-STORE.

Retrieval uses C-GET (the images come back on the same association, so the PACS needs no route
back to this machine). Our AE title must be known to the PACS (in Orthanc: REST
`PUT /modalities/<id>`), or C-FIND and C-GET are refused. The methods match `DicomWebPacs`.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydicom.dataset import Dataset

from .errors import PacsError
from .study import StudyImage, sort_study
from .vocabulary import DEFAULT_AET, MG_MODALITY

#: Seconds to wait for an association, a reply or network activity.
DIMSE_TIMEOUT = 30.0
_SUCCESS, _PENDING = 0x0000, (0xFF00, 0xFF01)
#: SOP classes a C-GET of a mammography series may deliver (for presentation and for processing).
_IMAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1",  # digital mammography
    "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",  # digital X-ray
    "1.2.840.10008.5.1.4.1.1.1",  # computed radiography
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
)


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ValueError naming the bad value."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"DIMSE address must be HOST:PORT, got {address!r}")
    return host, int(port)


class DimsePacs:
    """One DIMSE PACS.

    Args:
        host, port: the PACS's address.
        called_aet: the PACS's AE title.
        calling_aet: ours (must be registered in the PACS for C-FIND and C-GET).
    """

    def __init__(self, host: str, port: int, *, called_aet: str = "ANY-SCP", calling_aet: str = DEFAULT_AET,
                 timeout: float = DIMSE_TIMEOUT) -> None:
        self.host, self.port, self.called_aet, self.calling_aet = host, port, called_aet, calling_aet
        self.timeout = timeout
        self.name = f"DIMSE server {host}:{port} (AE {called_aet})"

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, attr, self.timeout)
        return ae

    def _associate(self, ae: Any, what: str, **kwargs: Any) -> Any:
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, **kwargs)
        if not assoc.is_established:
            raise PacsError(f"{self.name} is unreachable or refused the association while trying to {what}; check "
                            f"the address and AE titles, and that our AE title {self.calling_aet} is registered there.")
        return assoc

    def check(self) -> None:
        """C-ECHO. Raises PacsError when the PACS does not answer."""
        from pynetdicom.sop_class import Verification

        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc = self._associate(ae, "verify the connection (C-ECHO)")
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if not status or status.Status != _SUCCESS:
            raise PacsError(f"{self.name} did not confirm C-ECHO.")

    def _find(self, query: Dataset, what: str) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

        ae = self._ae()
        ae.add_requested_context(Find)
        assoc = self._associate(ae, what)
        found = []
        try:
            for status, identifier in assoc.send_c_find(query, Find):
                code = getattr(status, "Status", None)
                if code in _PENDING and identifier is not None:
                    found.append(identifier)
                elif code != _SUCCESS:
                    answer = "ended the association" if code is None else f"refused the query (status 0x{code:04X})"
                    raise PacsError(f"{self.name} {answer} while trying to {what}; is our AE title "
                                    f"{self.calling_aet} registered there?")
        finally:
            assoc.release()
        return found

    def find_studies(self, *, study: str | None = None, accession: str | None = None,
                     date: str | None = None) -> list[str]:
        """Study Instance UIDs matching the one key given (C-FIND, study level)."""
        if sum(bool(v) for v in (study, accession, date)) != 1:
            raise ValueError("give exactly one of study, accession or date")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study or ""
        query.AccessionNumber = accession or ""
        query.StudyDate = date or ""
        uids: list[str] = []
        for item in self._find(query, "search for studies"):
            uid = str(item.get("StudyInstanceUID", ""))
            if uid and uid not in uids:
                uids.append(uid)
        return uids

    def fetch_study(self, study_uid: str) -> tuple[list[StudyImage], list[str]]:
        """The study's for-presentation mammograms with their bytes, and one line per instance skipped.

        Finds the study's MG series (C-FIND), then retrieves each series (C-GET, our side as the
        storage SCP), then keeps the images to score.
        """
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get
        from pydicom.uid import AllTransferSyntaxes

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = MG_MODALITY
        series = [str(s.SeriesInstanceUID) for s in self._find(query, "list the study's series")
                  if str(s.get("Modality", MG_MODALITY)).upper() == MG_MODALITY and "SeriesInstanceUID" in s]
        received: list[bytes] = []

        def on_store(event: Any) -> int:
            received.append(event.encoded_dataset())
            return _SUCCESS

        ae = self._ae()
        ae.add_requested_context(Get)
        for uid in _IMAGE_CLASSES:
            ae.add_requested_context(uid, AllTransferSyntaxes)
        roles = [build_role(uid, scp_role=True) for uid in _IMAGE_CLASSES]
        skipped: list[str] = []
        for series_uid in series:
            assoc = self._associate(ae, "retrieve images (C-GET)", ext_neg=roles,
                                    evt_handlers=[(evt.EVT_C_STORE, on_store)])
            try:
                get = Dataset()
                get.QueryRetrieveLevel = "SERIES"
                get.StudyInstanceUID = study_uid
                get.SeriesInstanceUID = series_uid
                for status, _ in assoc.send_c_get(get, Get):
                    code = getattr(status, "Status", None)
                    if code is not None and code not in _PENDING and code != _SUCCESS:
                        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
                        skipped.append(f"series {series_uid}: C-GET ended with status 0x{code:04X}"
                                       f"{f' ({failed} images not sent)' if failed else ''}.")
            finally:
                assoc.release()
        images, unreadable = sort_study(("a received instance", data) for data in received)
        return images, skipped + unreadable

    def store(self, datasets: Sequence[Dataset], study_uid: str) -> None:
        """C-STORE result objects (they already carry the study's UIDs). Raises PacsError on any failure."""
        from pydicom.uid import ExplicitVRLittleEndian

        ae = self._ae()
        for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(uid, ExplicitVRLittleEndian)
        assoc = self._associate(ae, "store results (C-STORE)")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code != _SUCCESS:
                    raise PacsError(f"{self.name} refused a result object (C-STORE status "
                                    f"{'none' if code is None else f'0x{code:04X}'}).")
        finally:
            assoc.release()
