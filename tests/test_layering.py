"""The import graph keeps its layers: reading images (`mammo_core.io`), evaluation from predictions
(`mammo_core.evaluation`), the datasets and the card need no TensorFlow (the app's Metrics page and the
PACS writers load them cheaply), and nothing in mammo_core imports Streamlit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mammo_core"


def _modules_of(package: str) -> list[str]:
    """`package` and every module in it, found on disk (importing them is the subprocess's job)."""
    folder = ROOT / package.split(".", 1)[1].replace(".", "/")
    return [package] + sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


#: Whole stages that must stay free of TensorFlow, module by module, and single light modules elsewhere.
LIGHT = (_modules_of("mammo_core.io") + _modules_of("mammo_core.evaluation")
         + ["mammo_core.imaging", "mammo_core.data.datasets", "mammo_core.data.splits", "mammo_core.store.card",
            "mammo_core.store.files", "mammo_core.store.registry", "mammo_core.store.audit"])


def _imported_after(module: str, watched: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"found = [m for m in {watched!r} if m in sys.modules]; print(found); sys.exit(1 if found else 0)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          cwd=ROOT.parent)


def test_the_light_list_covers_both_stages():
    assert {"mammo_core.io.images", "mammo_core.io.dicom", "mammo_core.io.pixels", "mammo_core.io.preprocessing",
            "mammo_core.evaluation.metrics", "mammo_core.evaluation.bootstrap", "mammo_core.evaluation.calibration",
            "mammo_core.evaluation.breast_level"} <= set(LIGHT)


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_tensorflow(module):
    result = _imported_after(module, ("tensorflow", "keras"))
    assert result.returncode == 0, f"{module} imports {result.stdout.strip()} {result.stderr[-500:]}"


def test_mammo_core_never_imports_streamlit():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if "import streamlit" in p.read_text(encoding="utf-8") or "from streamlit" in p.read_text(encoding="utf-8")]
    assert offenders == []
    # and at run time: every module of the package imported, Streamlit still absent
    code = ("import sys, importlib, pkgutil, mammo_core\n"
            "for m in pkgutil.walk_packages(mammo_core.__path__, 'mammo_core.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "print('streamlit' in sys.modules); sys.exit(1 if 'streamlit' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert result.returncode == 0, f"streamlit imported: {result.stdout.strip()} {result.stderr[-800:]}"


def test_images_and_dicom_do_not_import_each_other_at_module_level():
    """io.images reads DICOM through a lazy import only; io.dicom takes its helpers from io.pixels, not io.images."""
    images = (ROOT / "io" / "images.py").read_text(encoding="utf-8").splitlines()
    dicom = (ROOT / "io" / "dicom.py").read_text(encoding="utf-8").splitlines()
    assert [line for line in images if line.startswith(("from mammo_core.io.dicom", "import mammo_core.io.dicom"))] == []
    assert [line for line in dicom if "mammo_core.io.images" in line or "mammo_core.imaging" in line] == []
