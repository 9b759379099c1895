"""Tokenizers: exact round trips, eos handling, BPE training on the bundled corpus, loading."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from scaletrain.data import BPETokenizer, ByteTokenizer, Tokenizer, bundled_corpus_path, load_tokenizer, train_bpe

SAMPLES = [
    "",
    "hello world",
    "  leading spaces and trailing  \n",
    "def f(x):\n\treturn x ** 2  # comment\r\n",
    "unicode: é ü ß 中文 🙂 \u00a0nbsp",
]


@pytest.fixture(scope="module")
def corpus_slice(tmp_path_factory) -> Path:
    """The first ~64 KB of the bundled corpus (cut at a line end, so it stays valid UTF-8)."""
    text = Path(bundled_corpus_path()).read_text(encoding="utf-8")
    cut = text.index("\n", 64_000) + 1
    path = tmp_path_factory.mktemp("bpe") / "slice.txt"
    path.write_text(text[:cut], encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="module")
def bpe(corpus_slice, tmp_path_factory) -> tuple[BPETokenizer, Path, float]:
    out = tmp_path_factory.mktemp("bpe_out") / "tok.json"
    t0 = time.perf_counter()
    tok = train_bpe([str(corpus_slice)], vocab_size=600, out_path=str(out))
    return tok, out, time.perf_counter() - t0


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_layout():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode(tok.encode("ab") + [tok.eos_id] + tok.encode("c")) == "abc"
    with pytest.raises(ValueError, match="257"):
        tok.decode([300])


def test_bpe_trains_fast_and_round_trips(bpe, corpus_slice):
    tok, out, seconds = bpe
    assert isinstance(tok, Tokenizer)
    assert out.is_file()
    assert seconds < 10, f"BPE training took {seconds:.1f}s"
    assert tok.vocab_size == 600
    assert 0 <= tok.eos_id < tok.vocab_size
    text = corpus_slice.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Merges were learned: code compresses well below one token per byte.
    assert len(ids) < 0.6 * len(text.encode("utf-8"))
    assert max(ids) < tok.vocab_size


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trips_unseen_text(bpe, text):
    tok = bpe[0]
    assert tok.decode(tok.encode(text)) == text


def test_bpe_save_load_same_ids_and_fingerprint(bpe, corpus_slice):
    tok, out, _ = bpe
    loaded = BPETokenizer.load(str(out))
    text = corpus_slice.read_text(encoding="utf-8")[:5000]
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_id == tok.eos_id and loaded.vocab_size == tok.vocab_size
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.fingerprint != ByteTokenizer().fingerprint
    assert tok.decode(tok.encode("a") + [tok.eos_id]) == "a"


def test_bpe_vocab_size_changes_fingerprint(corpus_slice, tmp_path, bpe):
    other = train_bpe([str(corpus_slice)], vocab_size=400, out_path=str(tmp_path / "small.json"))
    assert other.vocab_size == 400
    assert other.fingerprint != bpe[0].fingerprint


def test_load_tokenizer_specs(bpe):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = load_tokenizer(str(bpe[1]))
    assert isinstance(tok, BPETokenizer)
    assert tok.encode("x = 1") == bpe[0].encode("x = 1")


def test_load_tokenizer_parses_a_file_once_and_rereads_a_rewritten_one(corpus_slice, tmp_path):
    """Validation and the dataset both load the tokenizer: one parse per process, unless the file changed."""
    path = tmp_path / "tok.json"
    train_bpe([str(corpus_slice)], vocab_size=600, out_path=str(path))
    first = load_tokenizer(str(path))
    assert load_tokenizer(str(path)) is first
    train_bpe([str(corpus_slice)], vocab_size=400, out_path=str(path))
    again = load_tokenizer(str(path))
    assert again is not first and again.vocab_size < first.vocab_size


def test_load_tokenizer_bad_spec_names_it():
    with pytest.raises(ValueError, match="gpt2-xl"):
        load_tokenizer("gpt2-xl")


def test_load_tokenizer_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(str(path))


def test_load_tokenizer_without_eos_names_file(bpe, tmp_path):
    spec = json.loads(bpe[1].read_text(encoding="utf-8"))
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop("<|endoftext|>")
    path = tmp_path / "no_eos.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_eos\.json has no .*endoftext"):
        BPETokenizer.load(str(path))


def test_train_bpe_rejects_tiny_vocab(corpus_slice, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe([str(corpus_slice)], vocab_size=100, out_path=str(tmp_path / "t.json"))


def test_bpe_training_is_deterministic(corpus_slice, tmp_path, bpe):
    again = train_bpe([str(corpus_slice)], vocab_size=600, out_path=str(tmp_path / "again.json"))
    assert again.fingerprint == bpe[0].fingerprint


def test_bpe_txt_tokens_match_encode(bpe, corpus_slice, tmp_path):
    from scaletrain.data import load_tokens

    tok = bpe[0]
    arr = load_tokens(str(corpus_slice), tok, cache_dir=str(tmp_path))
    text = corpus_slice.read_text(encoding="utf-8")
    assert arr.tolist() == tok.encode(text) + [tok.eos_id]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_hf_tokenizer_gives_the_same_ids_in_transformers(kind, bpe, tmp_path):
    """What `scaletrain export --format hf` writes: transformers' AutoTokenizer encodes and decodes exactly
    as the tokenizer the model trained with, and knows its eos."""
    transformers = pytest.importorskip("transformers")
    from scaletrain.data.tokenizer import save_hf_tokenizer

    ours = ByteTokenizer() if kind == "byte" else bpe[0]
    save_hf_tokenizer(ours, tmp_path, model_max_length=256)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token_id == ours.eos_id and theirs.bos_token_id == ours.eos_id
    assert len(theirs) == ours.vocab_size
    for text in SAMPLES:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs.decode(ids + [ours.eos_id], skip_special_tokens=True) == text
