"""load_tokens (.txt/.bin/.npy, caching, every bad-input error) and TokenWindowDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaletrain.data import ByteTokenizer, TokenWindowDataset, load_tokens
from scaletrain.data.tokens import CACHE_SUFFIX


class CountingByteTokenizer(ByteTokenizer):
    """ByteTokenizer that counts encode calls, to tell a cache hit from a re-tokenization."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return super().encode(text)


class BigVocabTokenizer(ByteTokenizer):
    vocab_size = 70_000
    fingerprint = "big-vocab-test"


class TinyVocabTokenizer(ByteTokenizer):
    vocab_size = 100
    eos_id = 99
    fingerprint = "tiny-vocab-test"


def _caches(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(CACHE_SUFFIX))


# ----- .txt --------------------------------------------------------------------------------


def test_txt_tokenizes_appends_eos_and_caches(tmp_path):
    path = tmp_path / "doc.txt"
    text = "hello wörld\n" * 20
    path.write_text(text, encoding="utf-8")
    tok = CountingByteTokenizer()

    arr = load_tokens(str(path), tok)
    assert arr.dtype == np.uint16 and arr.ndim == 1
    assert arr.tolist() == list(text.encode("utf-8")) + [tok.eos_id]
    assert tok.calls == 1
    assert len(_caches(tmp_path)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temp file left behind"

    again = load_tokens(str(path), tok)
    assert tok.calls == 1, "second load should come from the cache"
    np.testing.assert_array_equal(again, arr)


def test_txt_cache_keyed_on_content_tokenizer_and_dtype(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("abc" * 50, encoding="utf-8")
    tok = CountingByteTokenizer()
    load_tokens(str(path), tok)
    load_tokens(str(path), tok, "uint32")
    assert tok.calls == 2 and len(_caches(tmp_path)) == 2

    path.write_text("xyz" * 50, encoding="utf-8")
    arr = load_tokens(str(path), tok)
    assert tok.calls == 3
    assert arr[:3].tolist() == list(b"xyz")

    class OtherFingerprint(CountingByteTokenizer):
        fingerprint = "other"

    load_tokens(str(path), OtherFingerprint())
    assert len(_caches(tmp_path)) == 4


def test_txt_cache_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = src / "doc.txt"
    path.write_text("some text " * 10, encoding="utf-8")
    cache_dir = tmp_path / "cache"
    arr = load_tokens(str(path), ByteTokenizer(), cache_dir=str(cache_dir))
    assert _caches(src) == []
    assert len(_caches(cache_dir)) == 1
    assert len(arr) == 101


def test_txt_vocab_does_not_fit_uint16_names_file(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("abc", encoding="utf-8")
    with pytest.raises(ValueError, match=r"big\.txt.*uint32"):
        load_tokens(str(path), BigVocabTokenizer(), "uint16")
    assert len(load_tokens(str(path), BigVocabTokenizer(), "uint32")) == 4


# ----- .bin / .npy -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_round_trip_memory_mapped(tmp_path, dtype):
    ids = np.arange(0, 257, dtype=dtype)[::-1].copy()
    path = tmp_path / "toks.bin"
    ids.tofile(path)
    arr = load_tokens(str(path), ByteTokenizer(), dtype)
    assert isinstance(arr, np.memmap)
    assert arr.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arr, ids)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_npy_round_trip_memory_mapped(tmp_path, dtype):
    ids = (np.arange(1000) % 257).astype(dtype)
    path = tmp_path / "toks.npy"
    np.save(path, ids)
    arr = load_tokens(str(path), ByteTokenizer())  # .npy carries its own dtype
    assert isinstance(arr, np.memmap)
    assert arr.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arr, ids)


# ----- one test per bad input; each message names the file or field ----------------------


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"absent\.bin.*does not exist"):
        load_tokens(str(tmp_path / "absent.bin"), ByteTokenizer())


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"\0\0")
    with pytest.raises(ValueError, match=r"data\.parquet.*unknown extension"):
        load_tokens(str(path), ByteTokenizer())


def test_unknown_token_dtype_names_field(tmp_path):
    path = tmp_path / "toks.bin"
    np.zeros(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="token_dtype"):
        load_tokens(str(path), ByteTokenizer(), "int64")


def test_npy_wrong_dtype(tmp_path):
    path = tmp_path / "wide.npy"
    np.save(path, np.arange(10, dtype=np.int64))
    with pytest.raises(ValueError, match=r"wide\.npy.*int64"):
        load_tokens(str(path), ByteTokenizer())


def test_npy_not_1d(tmp_path):
    path = tmp_path / "square.npy"
    np.save(path, np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"square\.npy.*1-D"):
        load_tokens(str(path), ByteTokenizer())


def test_bin_size_not_multiple_of_itemsize(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03\x00")  # 6 bytes: 3 uint16 but 1.5 uint32
    assert len(load_tokens(str(path), ByteTokenizer(), "uint16")) == 3
    with pytest.raises(ValueError, match=r"odd\.bin.*multiple"):
        load_tokens(str(path), ByteTokenizer(), "uint32")


def test_ids_out_of_vocab_bin(tmp_path):
    path = tmp_path / "foreign.bin"
    np.array([1, 2, 150, 3], dtype=np.uint16).tofile(path)
    assert len(load_tokens(str(path), ByteTokenizer())) == 4
    with pytest.raises(ValueError, match=r"foreign\.bin.*150 >= vocab_size 100"):
        load_tokens(str(path), TinyVocabTokenizer())


def test_ids_out_of_vocab_npy(tmp_path):
    path = tmp_path / "foreign.npy"
    np.save(path, np.array([5, 257, 1], dtype=np.uint32))
    with pytest.raises(ValueError, match=r"foreign\.npy.*257 >= vocab_size 257"):
        load_tokens(str(path), ByteTokenizer())


def test_too_few_tokens_for_one_window(tmp_path):
    path = tmp_path / "short.bin"
    np.arange(8, dtype=np.uint16).tofile(path)
    assert len(load_tokens(str(path), ByteTokenizer(), seq_len=7)) == 8
    with pytest.raises(ValueError, match=r"short\.bin.*seq_len=8"):
        load_tokens(str(path), ByteTokenizer(), seq_len=8)


def test_empty_txt_too_few_tokens(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt has 1 tokens"):
        load_tokens(str(path), ByteTokenizer(), seq_len=4)


def test_txt_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*UTF-8"):
        load_tokens(str(path), ByteTokenizer())


# ----- TokenWindowDataset ------------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "seq_len"), [(17, 4), (16, 4), (5, 4), (100, 1), (101, 10)])
def test_window_count_and_shift(num_tokens, seq_len):
    tokens = (np.arange(num_tokens) * 7 % 251).astype(np.uint16)
    ds = TokenWindowDataset(tokens, seq_len)
    assert len(ds) == (num_tokens - 1) // seq_len
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input", "target"}
        assert item["input"].dtype == torch.int64 and item["input"].shape == (seq_len,)
        assert item["target"].dtype == torch.int64 and item["target"].shape == (seq_len,)
        start = i * seq_len
        assert item["input"].tolist() == tokens[start : start + seq_len].tolist()
        assert item["target"].tolist() == tokens[start + 1 : start + seq_len + 1].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_windows_are_pure_and_do_not_overlap():
    tokens = np.arange(1, 42, dtype=np.uint32)
    ds = TokenWindowDataset(tokens, 8)
    inputs = [ds[i]["input"] for i in range(len(ds))]
    flat = torch.cat(inputs).tolist()
    assert flat == sorted(set(flat)), "windows overlap or repeat"
    assert torch.equal(ds[2]["input"], ds[2]["input"])
    ds[2]["input"][0] = -1  # mutating a returned item must not leak into later calls
    assert ds[2]["input"][0].item() == tokens[16]


def test_window_dataset_too_few_tokens_names_source():
    with pytest.raises(ValueError, match=r"corpus\.bin has 4 tokens.*seq_len=4"):
        TokenWindowDataset(np.arange(4, dtype=np.uint16), 4, source="corpus.bin")


def test_bundled_corpus_windows(tmp_path):
    from scaletrain.data import bundled_corpus_path

    # cache_dir keeps the test from writing a cache into the source tree.
    tokens = load_tokens(bundled_corpus_path(), ByteTokenizer(), seq_len=128, cache_dir=str(tmp_path))
    ds = TokenWindowDataset(tokens, 128)
    assert len(ds) == (len(tokens) - 1) // 128 > 1000
    text = ByteTokenizer().decode(ds[0]["input"].tolist())
    assert text.startswith("# scaletrain bundled corpus")


@pytest.mark.parametrize("ext", [".npy", ".bin"])
def test_window_dataset_pickles_memmap_by_reference(tmp_path, ext):
    """Workers started with spawn/forkserver must not receive a copy of the whole corpus."""
    import pickle

    ids = (np.arange(50_000) % 257).astype(np.uint16)
    path = tmp_path / f"toks{ext}"
    if ext == ".npy":
        np.save(path, ids)
    else:
        ids.tofile(path)
    tokens = load_tokens(str(path), ByteTokenizer())
    for arr, small in ((tokens, True), (tokens[1000:], False)):  # a slice falls back to a copy
        ds = TokenWindowDataset(arr, 32)
        blob = pickle.dumps(ds)
        assert (len(blob) < 2_000) == small
        clone = pickle.loads(blob)
        assert len(clone) == len(ds)
        for i in (0, 7, len(ds) - 1):
            assert torch.equal(clone[i]["input"], ds[i]["input"])
            assert torch.equal(clone[i]["target"], ds[i]["target"])
