"""The import graph keeps its layers: pixel reading, preprocessing, metrics and the card need no
TensorFlow (the app's Metrics page and the PACS writers load them cheaply), and nothing in mammo_core
imports Streamlit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LIGHT = ["mammo_core.imaging", "mammo_core.dicom", "mammo_core.preprocessing", "mammo_core.evaluate",
         "mammo_core.calibration", "mammo_core.card", "mammo_core.data", "mammo_core.registry", "mammo_core.audit",
         "mammo_core.breast_level"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_tensorflow(module):
    code = (f"import sys, {module}; heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} imports {result.stdout.strip()} {result.stderr[-500:]}"


def test_mammo_core_never_imports_streamlit():
    root = Path(__file__).resolve().parent.parent / "mammo_core"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "import streamlit" in p.read_text(encoding="utf-8") or "from streamlit" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_imaging_and_dicom_do_not_import_each_other_at_module_level():
    """imaging reads DICOM through a lazy import only; dicom takes its helpers from pixels, not imaging."""
    root = Path(__file__).resolve().parent.parent / "mammo_core"
    imaging = (root / "imaging.py").read_text(encoding="utf-8").splitlines()
    dicom = (root / "dicom.py").read_text(encoding="utf-8").splitlines()
    assert [line for line in imaging if line.startswith("from .dicom")] == []
    assert [line for line in dicom if "from .imaging" in line or "from mammo_core.imaging" in line] == []
