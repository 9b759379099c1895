"""Token arrays on disk and the fixed-length windows a language model trains on.

`load_tokens` turns one file into a 1-D uint16/uint32 array of token ids:

  .txt  tokenized with the given tokenizer (the whole file is one document, followed by eos),
        then cached as `<path>.<key>.tokcache.npy` beside it (or under `cache_dir` / the user
        cache when that folder is read-only). `key` hashes the tokenizer fingerprint, the
        file's bytes and the dtype, so an edited file or another tokenizer never hits a stale
        cache. Caches are written to a temp file and renamed, so concurrent ranks are safe.
  .bin  raw token ids with no header, dtype = `token_dtype`; memory-mapped.
  .npy  a 1-D uint16 or uint32 array; memory-mapped.

Every problem raises ValueError naming the file. `TokenWindowDataset` cuts non-overlapping
windows; item i is a pure function of i, as the core's loader requires.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from scaletrain.data.tokenizer import Tokenizer

TOKEN_DTYPES: dict[str, np.dtype] = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
CACHE_SUFFIX = ".tokcache.npy"


def _token_dtype(token_dtype: str) -> np.dtype:
    if token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"token_dtype must be one of {sorted(TOKEN_DTYPES)}, got {token_dtype!r}")
    return TOKEN_DTYPES[token_dtype]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """The tokenizer's `fingerprint`, or (for third-party tokenizers without one) a hash of its
    class, sizes and the ids of a probe string -- weaker, but still catches a swapped vocab."""
    fp = getattr(tokenizer, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    probe = "The quick brown fox\n\tdef f(x): return x ** 2  # é ü 中 🙂"
    desc = f"{type(tokenizer).__qualname__}|{tokenizer.vocab_size}|{tokenizer.eos_id}|{tokenizer.encode(probe)}"
    return "probe-" + hashlib.sha256(desc.encode("utf-8")).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$SCALETRAIN_CACHE/tokens, else $XDG_CACHE_HOME/scaletrain/tokens, else ~/.cache/..."""
    if os.environ.get("SCALETRAIN_CACHE"):
        return Path(os.environ["SCALETRAIN_CACHE"]) / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scaletrain" / "tokens"


def _save_npy_atomic(arr: np.ndarray, dest: Path) -> None:
    """Write `arr` to `dest` via a temp file in the same folder + rename, so a reader never
    sees a half-written cache and concurrent writers (one per rank) just race to identical
    content."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tokenize_txt(path: Path, tokenizer: Tokenizer, dtype: np.dtype, cache_dir: str | None) -> np.ndarray:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"token file {path} is not valid UTF-8 text: {e}") from e
    key_src = f"{tokenizer_fingerprint(tokenizer)}|{hashlib.sha256(raw).hexdigest()}|{dtype.name}"
    key = hashlib.sha256(key_src.encode("utf-8")).hexdigest()[:16]

    # Beside the file when its folder is writable, otherwise in the cache dir under a name that
    # also hashes the absolute path (two corpora called train.txt must not collide).
    beside = path.with_name(f"{path.name}.{key}{CACHE_SUFFIX}")
    if cache_dir is None and os.access(path.parent, os.W_OK):
        cache = beside
    else:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path_hash = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:8]
        cache = root / f"{path.name}.{path_hash}.{key}{CACHE_SUFFIX}"
    if cache.is_file():
        return np.load(cache, mmap_mode="r")

    ids = tokenizer.encode(text)
    ids.append(tokenizer.eos_id)
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and int(arr.max()) > np.iinfo(dtype).max:
        raise ValueError(f"tokenizing {path}: id {int(arr.max())} does not fit token_dtype {dtype.name}")
    _save_npy_atomic(arr.astype(dtype), cache)
    return np.load(cache, mmap_mode="r")


def _load_bin(path: Path, dtype: np.dtype) -> np.ndarray:
    size = path.stat().st_size
    if size % dtype.itemsize != 0:
        raise ValueError(
            f"token file {path} has {size} bytes, not a multiple of the {dtype.name} itemsize "
            f"({dtype.itemsize}); is token_dtype right?"
        )
    if size == 0:  # np.memmap refuses empty files; the length check below reports it
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"token file {path} is not a plain .npy array: {e}") from e
    if arr.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"token file {path} has dtype {arr.dtype}; expected uint16 or uint32")
    if arr.ndim != 1:
        raise ValueError(f"token file {path} has shape {arr.shape}; expected a 1-D array")
    return arr


def load_tokens(
    path: str,
    tokenizer: Tokenizer,
    token_dtype: str = "uint16",
    *,
    seq_len: int | None = None,
    cache_dir: str | None = None,
) -> np.ndarray:
    """Load (or tokenize and cache) `path` as a read-only 1-D uint16/uint32 token array.

    `token_dtype` is the on-disk dtype of .bin files and of the .txt cache (.npy files carry
    their own). With `seq_len`, the array must hold at least one window (seq_len + 1 tokens).
    Ids are checked against `tokenizer.vocab_size` with one vectorized max over the array.
    """
    p = Path(path)
    dtype = _token_dtype(token_dtype)
    if not p.is_file():
        raise ValueError(f"token file {p} does not exist")
    ext = p.suffix.lower()
    if ext == ".txt":
        if tokenizer.vocab_size - 1 > np.iinfo(dtype).max:
            raise ValueError(
                f"tokenizing {p}: vocab_size {tokenizer.vocab_size} does not fit token_dtype {dtype.name}; use uint32"
            )
        arr = _tokenize_txt(p, tokenizer, dtype, cache_dir)
    elif ext == ".bin":
        arr = _load_bin(p, dtype)
    elif ext == ".npy":
        arr = _load_npy(p)
    else:
        raise ValueError(f"token file {p} has unknown extension {p.suffix!r}; expected .txt, .bin or .npy")

    if arr.size:
        top = int(arr.max())
        if top >= tokenizer.vocab_size:
            raise ValueError(
                f"token file {p} contains id {top} >= vocab_size {tokenizer.vocab_size}; "
                "it was made with another tokenizer (or the wrong token_dtype)"
            )
    if seq_len is not None and len(arr) < seq_len + 1:
        raise ValueError(f"token file {p} has {len(arr)} tokens; one window of seq_len={seq_len} needs {seq_len + 1}")
    return arr


class TokenWindowDataset(torch.utils.data.Dataset):
    """Non-overlapping next-token windows over a 1-D token array.

    len = (len(tokens) - 1) // seq_len; item i = {"input": tokens[i*L : i*L+L],
    "target": tokens[i*L+1 : i*L+L+1]} as int64 tensors of shape [seq_len]. The trailing
    tokens that do not fill a window are never used. Memory-mapped arrays stay mapped: each
    item copies only its own window, so workers do not duplicate the corpus.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, source: str = "tokens") -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if tokens.ndim != 1:
            raise ValueError(f"{source}: expected a 1-D token array, got shape {tokens.shape}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{source} has {len(tokens)} tokens; one window of seq_len={seq_len} needs {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_windows = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def __getstate__(self) -> dict:
        # Pickling an np.memmap copies its contents; DataLoader workers started with spawn or
        # forkserver would each get a private copy of the corpus. Ship the file location instead.
        state = self.__dict__.copy()
        tokens = self.tokens
        # Only a memmap made directly on the file (its base is the mmap object): a slice keeps
        # its parent's `offset` attribute, so its location cannot be recovered that way.
        if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap) and tokens.filename is not None:
            state["tokens"] = ("memmap", str(tokens.filename), tokens.dtype.str, int(tokens.offset), len(tokens))
        return state

    def __setstate__(self, state: dict) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens[0] == "memmap":
            _, filename, dtype, offset, length = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=(length,))
        self.__dict__.update(state)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        start = i * self.seq_len
        # int64 copy of seq_len + 1 tokens: from_numpy cannot view uint16/uint32 memmaps anyway.
        chunk = torch.from_numpy(np.array(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return {"input": chunk[:-1].clone(), "target": chunk[1:].clone()}
