"""The T5 recipe's data: span corruption on the bundled corpus, or a procedural sequence-to-sequence task.

Vocabulary: the tokenizer's ids [0, n), then pad = n (also the decoder's start token, as in T5), then
data.sentinels sentinel ids n+1 ... (rendered <extra_id_i>); the tokenizer's eos ends every input and target.

Every item is a pure function of (job.seed, index) and holds fixed-length tensors:
  input [input_len] (encoder ids, pad-filled), target [target_len] (ids the decoder predicts, ending in eos,
  then IGNORE = -100, which the loss skips), decoder_input [target_len] (the target shifted right behind pad,
  pad-filled).

Tasks (data.task):
  span_corruption  T5's objective (Raffel et al. 2020, sec. 3.1.4): a window of the corpus with ~noise_density
                   of its tokens dropped in spans of mean length mean_span; each span becomes one sentinel in
                   the input, and the target lists each sentinel followed by the tokens it hides. The last
                   HELDOUT_WINDOWS windows of the corpus are held out for evaluation.
  reverse / sort   space-separated random letters ("q b x" -> "x b q" / "b q x").
  add              two numbers in digits, their sum in words ("12 + 345" -> "three hundred fifty seven").
The synthetic tasks split by a hash of the input text: an example is held out iff its hash is 0 mod 10, and
the training stream redraws those, so no held-out example is ever trained on.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from scaletrain.config.schema import JobConfig, opt
from scaletrain.data import bundled_corpus_path, load_tokenizer, load_tokens
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.images.datasets import item_seed, seeded_generator

HELDOUT_WINDOWS = 256  # span corruption: corpus windows kept out of training for evaluation
HELDOUT_MOD = 10  # synthetic tasks: 1 in 10 input texts is held out
IGNORE = -100  # target positions after eos (cross_entropy's ignore_index, HF's label padding)


@dataclass
class T5DataConfig:
    task: Literal["reverse", "sort", "add", "span_corruption"] = opt(
        "reverse", "reverse / sort (random letters), add (sum in words), or span_corruption (T5's objective)."
    )
    path: str = opt("bundled", "span_corruption: text (.txt) or token file; 'bundled' = the shipped corpus.")
    tokenizer: str = opt("byte", "'byte' or a tokenizer .json (scaletrain tokenizer train).")
    token_dtype: Literal["uint16", "uint32"] = opt("uint16", "On-disk dtype of .bin token files.")
    input_len: int = opt(64, "Encoder tokens per sample (eos included; padded).")
    target_len: int = opt(32, "Decoder tokens per sample (eos included; padded).")
    sentinels: int = opt(100, "Sentinel ids after pad (span corruption uses them; the vocabulary reserves them).")
    noise_density: float = opt(0.15, "span_corruption: fraction of a window's tokens hidden.")
    mean_span: float = opt(3.0, "span_corruption: mean length of a hidden span.")
    min_symbols: int = opt(3, "reverse/sort: fewest letters in a sample.")
    max_symbols: int = opt(10, "reverse/sort: most letters in a sample.")
    max_number: int = opt(999, "add: largest addend.")
    num_samples: int = opt(100_000, "Synthetic tasks: training examples per epoch.")


class Vocab:
    """The tokenizer plus pad and sentinels (ids above the tokenizer's)."""

    def __init__(self, tokenizer: Tokenizer, sentinels: int):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_id
        self.pad = tokenizer.vocab_size
        self.first_sentinel = self.pad + 1
        self.size = self.first_sentinel + sentinels

    def sentinel(self, i: int) -> int:
        return self.first_sentinel + i

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text up to the first eos; pad dropped, sentinels as <extra_id_i>."""
        out, run = [], []
        for i in map(int, ids):
            if i == self.eos:
                break
            if i >= self.first_sentinel:
                out += [self.tokenizer.decode(run), f"<extra_id_{i - self.first_sentinel}>"]
                run = []
            elif i != self.pad:
                run.append(i)
        return "".join(out) + self.tokenizer.decode(run)


def vocab_for(cfg: JobConfig) -> Vocab:
    return Vocab(load_tokenizer(cfg.data.tokenizer), cfg.data.sentinels)


def pack(vocab: Vocab, input_ids: list[int], target_ids: list[int], input_len: int, target_len: int) -> dict:
    """Fixed-length item tensors; the decoder input is the target shifted right behind pad (T5's start token)."""

    def padded(ids: list[int], length: int, fill: int) -> torch.Tensor:
        return torch.tensor(ids + [fill] * (length - len(ids)), dtype=torch.long)

    decoder_input = padded([vocab.pad, *target_ids][:target_len], target_len, vocab.pad)
    return {"input": padded(input_ids, input_len, vocab.pad), "decoder_input": decoder_input,
            "target": padded(target_ids, target_len, IGNORE)}  # fmt: skip


# -- span corruption ------------------------------------------------------------------------------
def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(hidden tokens, spans) of a window of `length`, as T5's random_spans_noise_mask rounds them."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def window_length(input_len: int, target_len: int, noise_density: float, mean_span: float) -> int:
    """The longest corpus window whose corrupted input and target (each + eos) fit; 0 when none does."""
    best = 0
    for length in range(2, input_len + target_len):
        noise, spans = span_counts(length, noise_density, mean_span)
        if length - noise + spans + 1 <= input_len and noise + spans + 1 <= target_len:
            best = length
    return best


def _segment(total: int, parts: int, generator: torch.Generator) -> list[int]:
    """A uniformly random split of `total` into `parts` positive lengths (T5's random_segmentation)."""
    cuts = torch.randperm(total - 1, generator=generator)[: parts - 1].sort().values + 1
    return torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([total])).tolist()


def corrupt_spans(tokens: list[int], vocab: Vocab, noise_density: float, mean_span: float, generator: torch.Generator):
    """(input ids, target ids), both ending in eos: kept and hidden spans alternate, starting with a kept one."""
    noise, spans = span_counts(len(tokens), noise_density, mean_span)
    hidden = _segment(noise, spans, generator)
    kept = _segment(len(tokens) - noise, spans, generator)
    source, target, at = [], [], 0
    for i, (n_kept, n_hidden) in enumerate(zip(kept, hidden, strict=True)):
        source += tokens[at : at + n_kept] + [vocab.sentinel(i)]
        target += [vocab.sentinel(i)] + tokens[at + n_kept : at + n_kept + n_hidden]
        at += n_kept + n_hidden
    return source + [vocab.eos], target + [vocab.eos]


class SpanCorruption:
    """Item i: window i of the corpus (non-overlapping, `window_length` tokens), corrupted with a mask seeded
    by (seed, i). split="heldout" reads the last HELDOUT_WINDOWS windows, which training never reads."""

    def __init__(self, cfg: JobConfig, split: Literal["train", "heldout"] = "train"):
        d = cfg.data
        self.vocab, self.seed, self.d = vocab_for(cfg), cfg.job.seed, d
        path = str(bundled_corpus_path()) if d.path == "bundled" else d.path
        self.window = window_length(d.input_len, d.target_len, d.noise_density, d.mean_span)
        self.tokens: np.ndarray = load_tokens(path, self.vocab.tokenizer, d.token_dtype, seq_len=self.window)
        windows = len(self.tokens) // self.window
        heldout = min(HELDOUT_WINDOWS, windows // 10)
        self.first, self.count = (0, windows - heldout) if split == "train" else (windows - heldout, heldout)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = (self.first + int(i)) * self.window
        window = self.tokens[start : start + self.window].astype(np.int64).tolist()
        generator = seeded_generator("t5-span", self.seed, self.first + int(i))
        source, target = corrupt_spans(window, self.vocab, self.d.noise_density, self.d.mean_span, generator)
        return pack(self.vocab, source, target, self.d.input_len, self.d.target_len)


# -- procedural tasks -----------------------------------------------------------------------------
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0 <= n < 10**6 in English words, without 'and' or hyphens: 357 -> 'three hundred fifty seven'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def synthetic_example(task: str, d: T5DataConfig, generator: torch.Generator) -> tuple[str, str]:
    """One (input text, target text) pair of a procedural task."""
    if task == "add":
        a, b = torch.randint(0, d.max_number + 1, (2,), generator=generator).tolist()
        return f"{a} + {b}", number_words(a + b)
    k = int(torch.randint(d.min_symbols, d.max_symbols + 1, (1,), generator=generator))
    letters = [string.ascii_lowercase[j] for j in torch.randint(0, 26, (k,), generator=generator).tolist()]
    answer = letters[::-1] if task == "reverse" else sorted(letters)
    return " ".join(letters), " ".join(answer)


def is_heldout(text: str) -> bool:
    return item_seed("t5-heldout", text) % HELDOUT_MOD == 0


def longest_synthetic(d: T5DataConfig) -> tuple[int, int]:
    """The most characters (bytes) a task's input and target text can have: an upper bound on their token
    counts for the byte tokenizer and byte-level BPE alike."""
    if d.task == "add":
        digits = len(str(d.max_number))
        return 2 * digits + 3, max(len(number_words(n)) for n in range(2 * d.max_number + 1))
    return 2 * d.max_symbols - 1, 2 * d.max_symbols - 1


class SyntheticTask:
    """Item i: an example drawn from a generator seeded by (task, seed, split, i), redrawn until it falls in
    its split (held out iff its input's hash is 0 mod HELDOUT_MOD)."""

    def __init__(self, cfg: JobConfig, split: Literal["train", "heldout"] = "train", size: int | None = None):
        self.vocab, self.seed, self.d, self.split = vocab_for(cfg), cfg.job.seed, cfg.data, split
        self.size = cfg.data.num_samples if size is None else size

    def __len__(self) -> int:
        return self.size

    def text(self, i: int) -> tuple[str, str]:
        generator = seeded_generator("t5", self.d.task, self.seed, self.split, int(i))
        while True:
            source, target = synthetic_example(self.d.task, self.d, generator)
            if is_heldout(source) == (self.split == "heldout"):
                return source, target

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        source, target = self.text(i)
        v = self.vocab
        return pack(v, v.encode(source) + [v.eos], v.encode(target) + [v.eos], self.d.input_len, self.d.target_len)


def build_dataset(cfg: JobConfig) -> SpanCorruption | SyntheticTask:
    return SpanCorruption(cfg) if cfg.data.task == "span_corruption" else SyntheticTask(cfg)


def heldout_dataset(cfg: JobConfig, n: int) -> SpanCorruption | SyntheticTask:
    if cfg.data.task == "span_corruption":
        return SpanCorruption(cfg, "heldout")
    return SyntheticTask(cfg, "heldout", size=n)


def check_lengths(d: T5DataConfig) -> list[tuple[bool, str]]:
    """The data rules that need no file: lengths fit the task (validate in __init__.py adds the rest)."""
    checks = [
        (d.input_len >= 1, f"data.input_len: {d.input_len} is not allowed; use >= 1"),
        (d.target_len >= 1, f"data.target_len: {d.target_len} is not allowed; the decoder needs >= 1 token"),
        (d.sentinels >= 0, f"data.sentinels: {d.sentinels} is not allowed; use >= 0"),
    ]
    if d.task == "span_corruption":
        window = window_length(d.input_len, d.target_len, d.noise_density, d.mean_span)
        _, spans = span_counts(max(window, 2), d.noise_density, d.mean_span)
        checks += [
            (0 < d.noise_density < 1, f"data.noise_density: {d.noise_density} is not allowed; use 0 < x < 1"),
            (d.mean_span >= 1, f"data.mean_span: {d.mean_span} is not allowed; use >= 1"),
            (window >= 2, f"data.target_len: {d.target_len} with data.input_len {d.input_len} leaves no corpus "
                          "window whose corrupted input and target fit; use longer lengths"),
            (spans <= d.sentinels, f"data.sentinels: {d.sentinels} is fewer than the {spans} spans a window of "
                                   f"{window} tokens has; use >= {spans}"),
        ]  # fmt: skip
        return checks
    source, target = longest_synthetic(d)
    checks += [
        (1 <= d.min_symbols <= d.max_symbols,
         f"data.min_symbols: {d.min_symbols} is not allowed; use 1 <= min_symbols <= max_symbols ({d.max_symbols})"),
        (d.max_number >= 0, f"data.max_number: {d.max_number} is not allowed; use >= 0"),
        (d.max_number < 500_000, f"data.max_number: {d.max_number} is not allowed; the sum is spelled below a "
                                 "million, use < 500000"),
        (d.num_samples >= 1, f"data.num_samples: {d.num_samples} is not allowed; use >= 1"),
        (source + 1 <= d.input_len, f"data.input_len: {d.input_len} is too short for task {d.task}: its inputs "
                                    f"take up to {source + 1} tokens with eos; use >= {source + 1}"),
        (target + 1 <= d.target_len, f"data.target_len: {d.target_len} is too short for task {d.task}: its "
                                     f"targets take up to {target + 1} tokens with eos; use >= {target + 1}"),
    ]  # fmt: skip
    return checks


def vocab_check(cfg: JobConfig) -> tuple[bool, str]:
    vocab = vocab_for(cfg)
    return (
        cfg.model.vocab_size >= vocab.size,
        f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary ({vocab.size} = "
        f"{vocab.tokenizer.vocab_size} tokenizer ids + pad + {cfg.data.sentinels} sentinels)",
    )
