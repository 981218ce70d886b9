"""`python -m bench.app_trace ...` = `streamlit run ...` with timers around the pieces of a Review rerun.

Used by `bench.app.measure_app(trace=True)` to split "upload to overlay shown" into server-side pieces
without touching the app: the page's own calls (the script run as a whole, decoding and preprocessing,
the model call with Grad-CAM, the overlay, the Plotly figure and its serialisation, the audit log) are
wrapped in this process before Streamlit starts, and each call appends one JSON line
`{"piece": ..., "t": start (epoch s), "s": seconds, ...}` to the file named by $MAMMO_BENCH_TRACE.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time

TRACE_ENV = "MAMMO_BENCH_TRACE"
_lock = threading.Lock()


def _write(row: dict) -> None:
    with _lock, open(os.environ[TRACE_ENV], "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _timed(owner, attr: str, piece: str, extra=None) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t0, c0 = time.time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            row = {"piece": piece, "t": t0, "s": time.perf_counter() - c0}
            if extra is not None:
                row.update(extra(*args, **kwargs))
            _write(row)

    setattr(owner, attr, wrapper)


def _figure_facts(*args, **kwargs) -> dict:
    fig = args[0] if args else kwargs.get("figure_or_data")
    try:
        return {"json_bytes": len(fig.to_json())}
    except Exception:  # noqa: BLE001 - a measurement aid only
        return {}


def install() -> None:
    import streamlit as st
    from streamlit.runtime.scriptrunner import script_runner

    from mammo_core.inference import explain, predict
    from mammo_core.store import audit
    from appkit import plots

    _timed(script_runner.ScriptRunner, "_run_script", "script run (whole page)")
    _timed(predict.Predictor, "_load", "decode + preprocess")
    _timed(predict.Predictor, "_fill_batch", "model call + Grad-CAM")
    _timed(predict.Prediction, "heatmap_on_original", "heatmap back onto the original")
    _timed(explain, "overlay", "overlay colouring")
    _timed(plots, "image_triplet_figure", "Plotly figure built (Zoom and pan)")
    _timed(st, "plotly_chart", "st.plotly_chart (serialise, send)", _figure_facts)
    _timed(plots, "outlined", "panels: breast outline drawn")
    _timed(st, "image", "st.image (PNG encode, send)")
    for name in ("record", "recent", "to_csv"):
        _timed(audit.AuditLog, name, f"audit log {name}")
    try:
        from appkit import shared
    except ImportError:  # run outside the repository root
        return
    _timed(shared, "setup", "page setup (config, sign-in, navigation, sidebar)")
    _timed(shared, "release_freed_memory", "release freed memory (gc / malloc_trim)")


def main() -> None:
    install()
    from streamlit.web import cli

    sys.argv = ["streamlit", *sys.argv[1:]]
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
