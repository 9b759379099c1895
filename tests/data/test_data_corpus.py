"""The bundled corpus: present, the advertised size, and reproducible by make_corpus.py."""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path

import pytest

from scaletrain.data import bundled_corpus_path
from scaletrain.data.corpus import make_corpus


def test_corpus_exists_with_licence():
    path = Path(bundled_corpus_path())
    assert path.is_file()
    assert 300_000 <= path.stat().st_size <= 600_000
    assert (path.parent / "LICENSE-PSF.txt").is_file()
    text = path.read_text(encoding="utf-8")
    assert "\r" not in text
    for rel in make_corpus.MODULES:
        assert f"# ===== Lib/{rel} =====" in text


def test_make_corpus_reproduces_checked_in_file():
    path = Path(bundled_corpus_path())
    header = path.read_text(encoding="utf-8").splitlines()[0]
    recorded = header.split("Python ")[1].split()[0]
    if recorded != platform.python_version():
        pytest.skip(f"corpus was made with Python {recorded}; this is {platform.python_version()}")
    rebuilt = make_corpus.build_corpus(Path(sysconfig.get_paths()["stdlib"]))
    assert rebuilt.encode("utf-8") == path.read_bytes()
