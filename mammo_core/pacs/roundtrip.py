"""The round trip: find studies on a PACS, retrieve their mammograms, score them by image, breast and
exam, and optionally store a Comprehensive SR and Grad-CAM Secondary Captures back into each study.

Works with any client that has `check`, `find_studies`, `fetch_study` and `store`
(`DicomWebPacs`, `DimsePacs`). The app, the CLI and the listener all go through `score_images`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

from pydicom.dataset import Dataset

from .errors import PacsError
from .scoring import DEFAULT_BREAST_RULE, StudyScore, score_study
from .study import StudyImage


class Pacs(Protocol):
    name: str

    def check(self) -> None: ...
    def find_studies(self, *, study: str | None = None, accession: str | None = None,
                     date: str | None = None) -> list[str]: ...
    def fetch_study(self, study_uid: str) -> tuple[list[StudyImage], list[str]]: ...
    def store(self, datasets: Sequence[Dataset], study_uid: str) -> None: ...


@dataclass
class StudyOutcome:
    """What happened to one study: its scores (None when nothing could be scored), notes, pushed objects."""

    study_uid: str
    score: StudyScore | None = None
    error: str | None = None  # a study-level problem, e.g. no mammogram to score
    skipped: list[str] = field(default_factory=list)
    sr_uid: str | None = None
    sc_uids: list[str] = field(default_factory=list)
    results_series: list[str] = field(default_factory=list)


def result_objects(score: StudyScore) -> tuple[Any, list[Any]]:
    """(SR, [SC per scored image]) for a scored study, each result kind in its own new series."""
    import highdicom as hd

    from .sc import build_capture
    from .sr import build_report

    sc_series = hd.UID()
    captures = [build_capture(s, model_name=score.model, series_uid=sc_series, instance_number=i + 1)
                for i, s in enumerate(score.scored)]
    return build_report(score, series_uid=hd.UID()), captures


def score_images(predictor: Any, study_uid: str, images: list[StudyImage], skipped: list[str], *,
                 rule: str = DEFAULT_BREAST_RULE, push_to: Pacs | None = None) -> StudyOutcome:
    """Score one study's retrieved images and, with `push_to`, store the SR and SCs into it.

    A study with no image to score gives an outcome with `error` set (nothing is pushed).
    Raises PacsError when the push fails.
    """
    outcome = StudyOutcome(study_uid=study_uid, skipped=list(skipped))
    if not images:
        outcome.error = (f"study {study_uid}: no for-presentation MG image to score"
                         f"{f' ({len(skipped)} other instances skipped)' if skipped else ''}.")
        return outcome
    outcome.score = score_study(predictor, study_uid, images, rule=rule, with_cam=push_to is not None)
    if not outcome.score.scored:
        outcome.error = f"study {study_uid}: none of its {len(images)} images could be scored."
        return outcome
    if push_to is not None:
        sr, captures = result_objects(outcome.score)
        push_to.store([*captures, sr], study_uid)
        outcome.sr_uid = str(sr.SOPInstanceUID)
        outcome.sc_uids = [str(c.SOPInstanceUID) for c in captures]
        outcome.results_series = [str(sr.SeriesInstanceUID)] + ([str(captures[0].SeriesInstanceUID)] if captures else [])
    return outcome


def round_trip(pacs: Pacs, predictor: Any, *, study: str | None = None, accession: str | None = None,
               date: str | None = None, push: bool = False, rule: str = DEFAULT_BREAST_RULE) -> Iterator[StudyOutcome]:
    """Score every study matching the one key given, pushing the results back when `push`.

    Raises PacsError when the PACS is unreachable, refuses us, or no study matches.
    """
    pacs.check()
    uids = pacs.find_studies(study=study, accession=accession, date=date)
    if not uids:
        key = "Study Instance UID" if study else "accession number" if accession else "study date"
        raise PacsError(f"{pacs.name}: no study matches the given {key}.")
    for uid in uids:
        images, skipped = pacs.fetch_study(uid)
        yield score_images(predictor, uid, images, skipped, rule=rule, push_to=pacs if push else None)
