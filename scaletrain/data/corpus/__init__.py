"""The bundled text corpus (CPython standard-library sources, PSF licence; see LICENSE-PSF.txt).

`stdlib_corpus.txt` is package data: `bundled_corpus_path()` finds it next to this module, so
it works from a source checkout and from an installed wheel alike.
"""

from __future__ import annotations

from pathlib import Path

CORPUS_FILENAME = "stdlib_corpus.txt"


def bundled_corpus_path() -> str:
    """Path of the bundled corpus .txt (about 525 KB of Python source code)."""
    # A plain path next to the module (not importlib.resources.as_file) because callers
    # memory-map and cache beside it; zipped installs are not supported by the token cache.
    path = Path(__file__).resolve().with_name(CORPUS_FILENAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled corpus {path} is missing: the package was installed without its data files "
            "(pyproject needs package-data for 'scaletrain.data.corpus' = ['*.txt'])"
        )
    return str(path)
