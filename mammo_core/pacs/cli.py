"""`python -m mammo_core pacs {echo,score,listen}`: the PACS round trip from the command line.

Credentials come from --username/--password or $MAMMO_PACS_USERNAME/$MAMMO_PACS_PASSWORD (the
environment keeps the password out of the process list); they are never printed. Output never
holds patient identifiers: images are named by laterality, view and SOP Instance UID.
Exit status: 0 every image scored; 1 PACS failure; 2 an image or a study could not be scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .vocabulary import BREAST_RULES, DEFAULT_AET, DEFAULT_BREAST_RULE, ENV_PASSWORD, ENV_URL, ENV_USERNAME

EXIT_OK, EXIT_FAIL, EXIT_REJECTED = 0, 1, 2


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _date(value: str) -> str:
    parts = value.split("-")
    if len(parts) > 2 or not all(len(p) == 8 and p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"date must be YYYYMMDD or YYYYMMDD-YYYYMMDD, got {value!r}")
    return value


def connect(args: argparse.Namespace) -> Any:
    """The PACS client the arguments name: DICOMweb (--dicomweb or $MAMMO_PACS_URL) or DIMSE (--dimse)."""
    if getattr(args, "dimse", None):
        from .dimse import DimsePacs, parse_address

        host, port = parse_address(args.dimse)
        return DimsePacs(host, port, called_aet=args.aet, calling_aet=args.calling_aet, timeout=args.timeout)
    url = getattr(args, "dicomweb", None) or os.environ.get(ENV_URL)
    if not url:
        raise ValueError(f"no PACS: pass --dicomweb URL or --dimse HOST:PORT, or set ${ENV_URL}.")
    return _dicomweb(url, args)


def _dicomweb(url: str, args: argparse.Namespace) -> Any:
    from .dicomweb import DicomWebPacs

    username = args.username or os.environ.get(ENV_USERNAME)
    password = args.password if args.password is not None else os.environ.get(ENV_PASSWORD)
    return DicomWebPacs(url, username=username, password=password, timeout=args.timeout)


def print_outcome(outcome: Any, *, as_json: bool) -> int:
    """Print one study's records (JSON lines or text); return how many items could not be scored."""
    from .scoring import json_records

    for line in outcome.skipped:
        _note(f"note: {line}")
    if outcome.error is not None and outcome.score is None:
        if as_json:
            print(json.dumps({"level": "study", "study": outcome.study_uid, "error": outcome.error}), flush=True)
        else:
            print(f"study {outcome.study_uid}\terror: {outcome.error}", flush=True)
        return 1
    records = json_records(outcome.score)
    if outcome.sr_uid:
        records.append({"level": "results", "study": outcome.study_uid, "sr_sop_instance_uid": outcome.sr_uid,
                        "sc_sop_instance_uids": outcome.sc_uids, "series": outcome.results_series})
    for r in records:
        if as_json:
            print(json.dumps(r), flush=True)
        elif "error" in r:
            print(f"{r['path']}\terror: {r['error']}", flush=True)
        elif r["level"] == "image":
            print(f"{r['path']}\t{r['probability']:.4f}\t{r['label']}", flush=True)
        elif r["level"] == "breast":
            print(f"breast {r['laterality']} ({r['rule']} of {', '.join(r['views'])})\t{r['probability']:.4f}\t"
                  f"{r['label']}", flush=True)
        elif r["level"] == "exam":
            print(f"exam {r['study']} ({r['rule']})\t{r['probability']:.4f}\t{r['label']}", flush=True)
        elif r["level"] == "results":
            print(f"pushed 1 SR and {len(r['sc_sop_instance_uids'])} Secondary Captures into study {r['study']}",
                  flush=True)
    errors = len(outcome.score.errors) + (outcome.error is not None)
    return errors


def cmd_echo(args: argparse.Namespace) -> int:
    pacs = connect(args)
    pacs.check()
    print(f"{pacs.name}: OK")
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from mammo_core.inference.predict import Predictor
    from .roundtrip import round_trip

    pacs = connect(args)
    pacs.check()  # fail on a wrong URL or password before loading a model
    predictor = Predictor.load(args.model, root=args.weights)
    rejected = 0
    for outcome in round_trip(pacs, predictor, study=args.study, accession=args.accession, date=args.date,
                              push=args.push_results, rule=args.breast_rule):
        rejected += print_outcome(outcome, as_json=args.json)
    return EXIT_REJECTED if rejected else EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    from mammo_core.inference.predict import Predictor
    from .listener import StudyListener

    push_to = _dicomweb(args.push_results_to, args) if args.push_results_to else None
    if push_to is not None:
        push_to.check()
    predictor = Predictor.load(args.model, root=args.weights)
    predictor.warm_up()
    status = {"rejected": 0}

    def scored(outcome: Any) -> None:
        status["rejected"] += print_outcome(outcome, as_json=args.json)

    listener = StudyListener(args.out, predictor, port=args.port, host=args.host, aet=args.aet,
                             idle_seconds=args.idle, push_to=push_to, rule=args.breast_rule, on_scored=scored,
                             on_error=lambda m: _note(f"error: {m}"))
    try:
        listener.start()
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}).") from None
    _note(f"listening on {args.host}:{args.port} as AE {args.aet}; received files go to {args.out}; "
          f"a study is scored {args.idle:g} s after its last image (Ctrl-C stops)")
    try:
        while args.max_studies is None or listener.scored_count < args.max_studies:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    return EXIT_REJECTED if status["rejected"] else EXIT_OK


def _connection_options(p: argparse.ArgumentParser, *, dimse: bool = True) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dicomweb", metavar="URL", help=f"DICOMweb root, e.g. http://pacs:8042/dicom-web "
                       f"(default: ${ENV_URL})")
    if dimse:
        where.add_argument("--dimse", metavar="HOST:PORT", help="a DIMSE PACS instead (C-FIND, C-GET, C-STORE)")
        p.add_argument("--aet", default="ANY-SCP", help="with --dimse: the PACS's AE title (default ANY-SCP)")
        p.add_argument("--calling-aet", default=DEFAULT_AET,
                       help=f"with --dimse: our AE title, registered in the PACS (default {DEFAULT_AET})")
    _credential_options(p)


def _credential_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--username", default=None, help=f"DICOMweb user (default: ${ENV_USERNAME})")
    p.add_argument("--password", default=None,
                   help=f"DICOMweb password (default: ${ENV_PASSWORD}; prefer the variable: a command line is "
                        "visible to other users)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the PACS (default 30)")


def add_pacs_parser(sub: Any) -> None:
    """Register `pacs` and its subcommands on the main parser's subparsers."""
    pacs = sub.add_parser("pacs", help="PACS round trip: score a study by breast and exam, push back an SR and "
                          "Secondary Captures")
    psub = pacs.add_subparsers(dest="pacs_command", required=True)

    p = psub.add_parser("echo", help="check that a PACS answers and accepts the credentials")
    _connection_options(p)
    p.set_defaults(func=cmd_echo)

    p = psub.add_parser("score", help="find a study, score every mammogram, each breast and the exam")
    _connection_options(p)
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--study", metavar="UID", help="Study Instance UID")
    key.add_argument("--accession", metavar="A", help="accession number (exact)")
    key.add_argument("--date", metavar="YYYYMMDD[-YYYYMMDD]", type=_date, help="study date or date range")
    p.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    p.add_argument("--breast-rule", default=DEFAULT_BREAST_RULE, choices=BREAST_RULES,
                   help=f"how a breast's views combine into its score (default {DEFAULT_BREAST_RULE})")
    p.add_argument("--push-results", action="store_true",
                   help="store a Comprehensive SR and a Grad-CAM Secondary Capture per image into the study")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_score)

    p = psub.add_parser("listen", help="receive studies pushed over DICOM (storage SCP) and score each once complete")
    p.add_argument("--port", type=int, required=True, help="DICOM port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--aet", default=DEFAULT_AET, help=f"our AE title (default {DEFAULT_AET})")
    p.add_argument("--out", type=Path, required=True, help="folder for the received files (one subfolder per study)")
    p.add_argument("--idle", type=float, default=10.0,
                   help="seconds without a new image after which a study is complete (default 10)")
    p.add_argument("--push-results-to", metavar="URL", default=None, help="DICOMweb root to store the SR and SCs into")
    _credential_options(p)
    p.add_argument("--model", default=None, help="model name or directory (default: the active model)")
    p.add_argument("--breast-rule", default=DEFAULT_BREAST_RULE, choices=BREAST_RULES)
    p.add_argument("--max-studies", type=int, default=None, help="stop after scoring this many studies (scripts, tests)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_listen)
