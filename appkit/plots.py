"""Plotly figures for the app (images with linked zoom, ROC, confusion matrix, histograms, training
curves, reliability diagram) and the small array/table preparations they need.

No Streamlit here: every function returns a `plotly.graph_objects.Figure` or plain data, so the
figures can also be saved from a script or checked in a test.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from mammo_core.config import CLASS_NAMES

#: Longest side, in pixels, of an image sent to the browser. A full-field mammogram (~13 MP) would
#: be megabytes of PNG per view; 1280 px keeps zooming useful and the page light.
DISPLAY_MAX_SIDE = 1280

CLASS_COLORS = {"benign": "#2b8cbe", "malignant": "#e6550d"}
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf")


def fit_for_display(pixels: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """Downscale (never upscale) a uint8 image, 2-D or RGB, so its longest side is at most `max_side`."""
    from PIL import Image

    h, w = pixels.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return pixels
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def png_data_uri(pixels: np.ndarray) -> str:
    """A uint8 2-D or RGB array as a base64 PNG data URI (what go.Image's `source` takes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_pair_figure(left: np.ndarray, right: np.ndarray, *, titles: Sequence[str] = ("Original", "Grad-CAM overlay"),
                      height: int = 520) -> Any:
    """Two same-sized images side by side whose zoom and pan are linked (drag to zoom, double-click to reset)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=list(titles), horizontal_spacing=0.02)
    for col, pixels in enumerate((left, right), start=1):
        fig.add_trace(go.Image(source=png_data_uri(pixels), hoverinfo="skip"), row=1, col=col)
    axes = dict(showticklabels=False, ticks="", showgrid=False, zeroline=False, showline=False)
    fig.update_xaxes(matches="x", **axes)
    fig.update_yaxes(matches="y", scaleanchor="x", **axes)
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=30, b=0), dragmode="zoom")
    return fig


def image_triplet_figure(original: np.ndarray, model_input: np.ndarray, overlaid: np.ndarray, *,
                         outline: np.ndarray | None = None, height: int = 520) -> Any:
    """The original (with the breast outline), the model's 224x224 input, and the Grad-CAM overlay drawn
    back onto the original. The first and third share zoom and pan (same coordinates)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.02, column_widths=[0.4, 0.2, 0.4],
                        subplot_titles=["Original, breast outlined", "What the model saw", "Grad-CAM on the original"])
    for col, pixels in enumerate((original, model_input, overlaid), start=1):
        fig.add_trace(go.Image(source=png_data_uri(pixels), hoverinfo="skip"), row=1, col=col)
    if outline is not None and len(outline):
        fig.add_trace(go.Scatter(x=outline[:, 1], y=outline[:, 0], mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(color="#00e5ff", width=1.5)), row=1, col=1)
    axes = dict(showticklabels=False, ticks="", showgrid=False, zeroline=False, showline=False)
    fig.update_xaxes(**axes)
    fig.update_yaxes(**axes)
    fig.update_xaxes(matches="x", row=1, col=3)
    fig.update_yaxes(matches="y", row=1, col=3)
    for col, x in ((1, "x"), (2, "x2"), (3, "x3")):
        fig.update_yaxes(scaleanchor=x, row=1, col=col)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=30, b=0), dragmode="zoom")
    return fig


def outlined(pixels: np.ndarray, outline: np.ndarray | None, *, colour: tuple[int, int, int] = (0, 229, 255),
             width: int | None = None) -> np.ndarray:
    """An RGB copy of a uint8 image with the (row, col) outline drawn as a closed line (the static panel's
    counterpart of the figure's outline trace)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(pixels).convert("RGB")
    if outline is not None and len(outline) > 1:
        points = [(float(c), float(r)) for r, c in outline]
        ImageDraw.Draw(image).line(points + points[:1], fill=colour,
                                   width=width or max(1, round(max(image.size) / 400)))
    return np.asarray(image)


def colour_bar(floor: float, *, width: int = 256, height: int = 14) -> np.ndarray:
    """The overlay's colour scale as an RGB uint8 strip, 0 (left) to 1 (right): `explain.overlay` itself
    drawn at full opacity over mid-grey, so the strip shows exactly what the overlay colours and leaves
    grey below `floor`."""
    from mammo_core.inference.explain import overlay

    ramp = np.repeat(np.linspace(0.0, 1.0, width, dtype=np.float32)[None], height, axis=0)
    return overlay(np.full((height, width), 128, dtype=np.uint8), ramp, alpha=1.0, floor=floor)


def roc_figure(curves: Iterable[dict[str, Any]], *, threshold: float) -> Any:
    """ROC curves, one per model: dicts with label, fpr, tpr, auc and `point` = (fpr, tpr) at `threshold`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"),
                             name="chance", hoverinfo="skip"))
    for i, c in enumerate(curves):
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        fig.add_trace(go.Scatter(x=c["fpr"], y=c["tpr"], mode="lines", line=dict(color=color, width=2),
                                 name=f"{c['label']} (AUC {c['auc']:.3f})"))
        fx, ty = c["point"]
        fig.add_trace(go.Scatter(x=[fx], y=[ty], mode="markers", marker=dict(size=12, color=color, symbol="x"),
                                 name=f"{c['label']} at threshold {threshold:.2f}",
                                 hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title="False-positive rate (1 - specificity)", yaxis_title="True-positive rate (sensitivity)",
                      height=460, margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def confusion_figure(matrix: Sequence[Sequence[int]], *, title: str = "") -> Any:
    """2x2 confusion matrix [[TN, FP], [FN, TP]] as an annotated heatmap (rows true, columns predicted)."""
    import plotly.graph_objects as go

    cm = np.asarray(matrix, dtype=int)
    labels = list(CLASS_NAMES)
    text = [[f"{name}<br>{cm[i, j]}" for j, name in enumerate(row)] for i, row in enumerate((("TN", "FP"), ("FN", "TP")))]
    fig = go.Figure(go.Heatmap(z=cm, x=[f"pred. {n}" for n in labels], y=[f"true {n}" for n in labels],
                               text=text, texttemplate="%{text}", colorscale="Blues", showscale=False,
                               hovertemplate="%{y}, %{x}: %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=300, margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    return fig


def probability_histogram(table: pd.DataFrame, *, threshold: float, title: str = "", bins: int = 25) -> Any:
    """Histogram of predicted probabilities, overlaid by true class, with the threshold marked.
    `table` needs columns `label` (0/1) and `probability`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, name in enumerate(CLASS_NAMES):
        values = table.loc[table["label"] == label, "probability"]
        fig.add_trace(go.Histogram(x=values, name=f"true {name} ({len(values)})", opacity=0.65,
                                   xbins=dict(start=0, end=1.0001, size=1 / bins), marker_color=CLASS_COLORS[name]))
    fig.add_vline(x=threshold, line=dict(color="black", dash="dash"), annotation_text=f"threshold {threshold:.2f}")
    fig.update_layout(barmode="overlay", title=title, xaxis_title="Predicted probability of malignancy",
                      yaxis_title="Images", height=320, margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    fig.update_xaxes(range=[0, 1])
    return fig


def history_figure(rows: Sequence[dict[str, float]], *, current: dict[str, Any] | None = None) -> Any:
    """Training curves: loss and accuracy per epoch, train and validation. `current` (epoch, logs)
    adds the running epoch's partial training values as an open marker."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"))
    frame = pd.DataFrame(list(rows))
    for col, metric in enumerate(("loss", "accuracy"), start=1):
        for prefix, name, dash in (("", "train", "solid"), ("val_", "validation", "dash")):
            key = prefix + metric
            if not frame.empty and key in frame:
                fig.add_trace(go.Scatter(x=frame["epoch"], y=frame[key], mode="lines+markers", name=f"{name} {metric}",
                                         line=dict(dash=dash)), row=1, col=col)
        if current and metric in (current.get("logs") or {}):
            fig.add_trace(go.Scatter(x=[current["epoch"]], y=[current["logs"][metric]], mode="markers",
                                     marker=dict(symbol="circle-open", size=10), name=f"epoch {current['epoch']} so far"),
                          row=1, col=col)
    fig.update_xaxes(title_text="epoch", tickformat="d", dtick=1 if len(frame) <= 12 else None)
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10))
    return fig


def reliability_table(labels: Sequence[int], probabilities: Sequence[float], *, n_bins: int = 10) -> pd.DataFrame:
    """Equal-width probability bins: mean predicted probability, observed fraction malignant and count
    per non-empty bin (the points of a reliability diagram)."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probabilities, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            rows.append({"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "mean_predicted": float(p[mask].mean()),
                         "fraction_malignant": float(y[mask].mean()), "count": int(mask.sum())})
    return pd.DataFrame(rows, columns=["bin", "mean_predicted", "fraction_malignant", "count"])


def reliability_figure(curves: Iterable[dict[str, Any]]) -> Any:
    """Reliability diagram: dicts with label, table (from `reliability_table`) and brier."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"),
                             name="perfectly calibrated", hoverinfo="skip"))
    for i, c in enumerate(curves):
        t = c["table"]
        fig.add_trace(go.Scatter(x=t["mean_predicted"], y=t["fraction_malignant"], mode="lines+markers",
                                 marker=dict(size=6 + 14 * np.sqrt(t["count"] / max(t["count"].max(), 1))),
                                 line=dict(color=MODEL_COLORS[i % len(MODEL_COLORS)]),
                                 name=f"{c['label']} (Brier {c['brier']:.3f})", customdata=t["count"],
                                 hovertemplate="predicted %{x:.2f}<br>observed %{y:.2f}<br>%{customdata} images<extra></extra>"))
    fig.update_layout(xaxis_title="Mean predicted probability", yaxis_title="Observed fraction malignant",
                      height=380, margin=dict(l=10, r=10, t=30, b=10))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig
