"""Tokenizers: the `Tokenizer` protocol, a byte tokenizer and a locally trained byte-level BPE.

Every tokenizer has a `fingerprint`: a short hex string that changes whenever the mapping from
text to ids could change. `scaletrain.data.tokens` keys its token caches on it, so a cache made
with one tokenizer is never read back with another.

`load_tokenizer(spec)` is what configs call: "byte" or the path of a tokenizer .json written by
`train_bpe` (any HF `tokenizers` JSON with an "<|endoftext|>" token works too).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

EOS_TOKEN = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    Ids are in [0, vocab_size); `eos_id` is one of them and marks the end of a document.
    `decode(encode(s)) == s` for every str s (both bundled tokenizers guarantee it).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids: byte b -> id b (0..255), plus eos = 256; vocab_size = 257.

    No training, no files, no unknown tokens. `decode` drops eos ids and replaces invalid
    UTF-8 (which only arises from arbitrary id lists, never from `encode` output) with U+FFFD.
    """

    vocab_size: int = 257
    eos_id: int = 256
    fingerprint: str = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside [0, {self.vocab_size})")
            out.append(i)
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """Byte-level BPE from HF `tokenizers`; build with `train_bpe` or `BPETokenizer.load`."""

    def __init__(self, tokenizer, *, source: str = "<in memory>") -> None:
        # `tokenizer` is a `tokenizers.Tokenizer`; untyped so importing this module stays cheap.
        self._tok = tokenizer
        self._source = source
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer {source} has no {EOS_TOKEN!r} token; train it with train_bpe")
        self._eos_id = int(eos)
        # The serialized JSON captures model, pre-tokenizer, normalizer and decoder: everything
        # that decides the ids, so hashing it is an exact fingerprint.
        self._fingerprint = "bpe-" + hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        if not Path(path).is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"tokenizer file {path} is not a valid HF tokenizers JSON: {e}") from e
        return cls(hf, source=str(path))

    def save(self, path: str) -> None:
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        # No post-processor is configured, so add_special_tokens=False only guards against
        # foreign JSONs that add BOS/EOS on their own; the data pipeline places eos itself.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(source={self._source!r}, vocab_size={self.vocab_size})"


def train_bpe(files: list[str], vocab_size: int, out_path: str) -> BPETokenizer:
    """Train a byte-level BPE on local `files`, save it as JSON at `out_path`, and return it.

    The 256 byte symbols and eos are always in the vocabulary, so any text round-trips
    exactly; `vocab_size` counts them and must be at least 257 + 1.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + eos + at least one merge), got {vocab_size}")
    if not files:
        raise ValueError("train_bpe: files is empty")
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"train_bpe: training file {f} does not exist")

    hf = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(s)) == s (no space inserted at the start).
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(f) for f in files], trainer)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(out_path))
    return BPETokenizer(hf, source=str(out_path))


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of HF's ByteLevel pre-tokenizer and decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def hf_tokenizer(tokenizer: Tokenizer):
    """The same text <-> ids mapping as a `tokenizers.Tokenizer` (what transformers' fast tokenizers wrap).

    The byte tokenizer becomes a byte-level BPE with no merges: byte b -> id b, eos -> 256."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer._tok
    if not isinstance(tokenizer, ByteTokenizer):
        raise ValueError(f"{tokenizer!r} has no Hugging Face equivalent")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOS_TOKEN])
    assert hf.token_to_id(EOS_TOKEN) == tokenizer.eos_id
    return hf


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json in `out_dir`, so `AutoTokenizer.from_pretrained(out_dir)` loads
    the tokenizer the model was trained with (eos doubles as bos: the data pipeline places only eos)."""
    out_dir = Path(out_dir)
    hf_tokenizer(tokenizer).save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(spec: str) -> Tokenizer:
    """Spec "byte" -> ByteTokenizer(); a path ending in .json -> BPETokenizer.load(path).

    A .json is parsed once per process and file version: validation and the dataset both ask for it.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            return BPETokenizer.load(spec)  # raises, naming the file
        stat = path.stat()
        return _load_bpe_cached(str(path.resolve()), (stat.st_mtime_ns, stat.st_size))
    raise ValueError(f"tokenizer spec {spec!r} is neither 'byte' nor a path to a tokenizer .json")


@functools.lru_cache(maxsize=8)
def _load_bpe_cached(path: str, version: tuple[int, int]) -> BPETokenizer:
    # version (mtime, size) is only part of the key: a rewritten file is read again.
    return BPETokenizer.load(path)
