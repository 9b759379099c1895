"""The T5 model and its data, in one process.

- HF export: the exported folder loads in transformers' T5ForConditionalGeneration and gives the same logits
  (within 1e-5) on inputs with encoder padding and lengths past the exact buckets, for the v1.1 layout
  (gated GELU, untied head) and the original one (ReLU, tied head scaled by D^-0.5); import gives back the
  same tensors. Mutations seen failing (max logit difference): the tied head without the D^-0.5 scaling (20),
  scores scaled by E^-0.5 (4.2), the decoder's buckets bidirectional (0.96), the causal mask dropped (5.7).
- Causality: d(decoder output at i) / d(decoder input at j) is zero for every j > i and not for j <= i.
  Mutation seen failing: the causal mask dropped (triu(1) -> triu(T)).
- Decoding: beam search with one beam returns greedy's tokens.
- Commands (-m slow): `scaletrain sample` (greedy and beam) and `scaletrain export --format hf` read a checkpoint.
- Data: items are pure functions of (seed, index); span corruption hides ~15 % of a window in sentinel-
  delimited spans that reassemble the window exactly; held-out synthetic inputs never occur in training.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from st_common import REPO

from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.recipes.t5 import hf
from scaletrain.recipes.t5.data import IGNORE, SpanCorruption, SyntheticTask, is_heldout, number_words, vocab_for
from scaletrain.recipes.t5.decoding import beam_search, greedy
from scaletrain.recipes.t5.model import T5

CONFIG = str(REPO / "scaletrain" / "recipes" / "t5" / "configs" / "t5-tiny.yaml")
SMALL = ["--model.dim", "32", "--model.n_heads", "4", "--model.head_dim", "8", "--model.ffn_hidden", "48",
         "--model.num_buckets", "8", "--model.max_distance", "12"]  # fmt: skip


def build(overrides: list[str], seed: int = 0) -> tuple[T5, object]:
    cfg = load_config(CONFIG, SMALL + overrides)
    with torch.device("meta"):
        model = T5(cfg.model)
    init_model(model, "cpu", seed)
    with torch.no_grad():  # off the init: norms at exactly 1 would hide a misplaced norm weight
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), cfg


@pytest.mark.parametrize(
    "overrides", [["--model.mlp", "gated-gelu", "--model.tie_embeddings", "false"],
                  ["--model.mlp", "relu", "--model.tie_embeddings", "true", "--model.n_decoder_layers", "3"]],
    ids=["v1.1_untied", "original_tied"],
)  # fmt: skip
def test_hf_export_gives_transformers_the_same_logits(overrides, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, cfg = build(overrides)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf.export_hf(cfg, state, tmp_path)
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.manual_seed(1)
    vocab = vocab_for(cfg)
    input_BS = torch.randint(0, 257, (3, 20))
    input_BS[0, 14:] = vocab.pad  # encoder padding
    decoder_BT = torch.randint(0, 257, (3, 17))
    decoder_BT[:, 0] = vocab.pad  # the start token
    with torch.no_grad():
        ours = model(input_BS, decoder_BT)
        reference = theirs(
            input_ids=input_BS, attention_mask=(input_BS != vocab.pad).long(), decoder_input_ids=decoder_BT
        ).logits
    assert ours.shape == reference.shape
    # Observed: 3.5e-6 (gated: torch's tanh GELU vs HF's gelu_new formula), 0.0 (ReLU), logits up to ~4.4.
    assert (ours - reference).abs().max() <= 1e-5, (ours - reference).abs().max()
    overrides_back, tensors = hf.import_hf(tmp_path)
    assert overrides_back["tie_embeddings"] == cfg.model.tie_embeddings and overrides_back["mlp"] == cfg.model.mlp
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)


def test_decoder_output_does_not_depend_on_later_inputs():
    model, cfg = build([])
    torch.manual_seed(0)
    input_BS = torch.randint(0, 257, (2, 10))
    memory_BSD = model.encode(input_BS).detach()
    T = 9
    h_BTD = torch.randn(2, T, cfg.model.dim, requires_grad=True)
    out_BTD = model.decode(h_BTD, memory_BSD, input_BS)
    for i in range(T):
        (grad_BTD,) = torch.autograd.grad(out_BTD[:, i].sum(), h_BTD, retain_graph=True)
        per_position = grad_BTD.abs().sum(dim=(0, 2))
        assert (per_position[i + 1 :] == 0).all(), (i, per_position)
        assert (per_position[: i + 1] > 0).all(), (i, per_position)


def test_one_beam_is_greedy():
    model, cfg = build([])
    vocab = vocab_for(cfg)
    for text in ("a b c", "q w e r t y"):
        input_1S = torch.tensor([vocab.encode(text) + [vocab.eos]])
        greedy_ids = greedy(model, input_1S, 8, vocab.pad, vocab.eos)[0].tolist()
        beam_ids = beam_search(model, input_1S, 1, 8, vocab.pad, vocab.eos)
        assert vocab.decode(beam_ids) == vocab.decode(greedy_ids)


def test_span_corruption_hides_spans_that_reassemble_the_window():
    cfg = load_config(CONFIG, ["--data.task", "span_corruption", "--data.input_len", "64", "--data.target_len", "24"])
    data, vocab = SpanCorruption(cfg), vocab_for(cfg)
    assert data.window > 64  # the inputs lose the hidden tokens and gain one sentinel per span
    for i in (0, 7, len(data) - 1):
        item = data[i]
        assert all(torch.equal(item[k], data[i][k]) for k in item)  # a pure function of the index
        source = [t for t in item["input"].tolist() if t != vocab.pad]
        target = [t for t in item["target"].tolist() if t != IGNORE]
        assert source[-1] == target[-1] == vocab.eos
        spans: dict[int, list[int]] = {}
        for t in target[:-1]:
            if t >= vocab.first_sentinel:
                spans[t] = []
            else:
                spans[list(spans)[-1]].append(t)
        rebuilt = [u for t in source[:-1] for u in (spans[t] if t >= vocab.first_sentinel else [t])]
        start = (data.first + i) * data.window
        assert rebuilt == data.tokens[start : start + data.window].tolist()
        hidden = sum(len(s) for s in spans.values())
        assert abs(hidden / data.window - 0.15) < 0.02 and len(spans) == round(hidden / 3)
        assert item["decoder_input"][0] == vocab.pad and torch.equal(item["decoder_input"][1:4], item["target"][:3])


@pytest.mark.parametrize("task", ["reverse", "sort", "add"])
def test_synthetic_items_are_pure_and_held_out(task):
    cfg = load_config(CONFIG, ["--data.task", task, "--data.input_len", "16", "--data.target_len", "48"])
    train, heldout = SyntheticTask(cfg), SyntheticTask(cfg, "heldout", size=50)
    texts = [train.text(i) for i in range(200)]
    assert texts == [train.text(i) for i in range(200)]
    assert not any(is_heldout(source) for source, _ in texts)
    assert all(is_heldout(heldout.text(i)[0]) for i in range(50))
    source, target = texts[0]
    if task == "add":
        a, b = map(int, source.split(" + "))
        assert target == number_words(a + b)
        assert number_words(357) == "three hundred fifty seven" and number_words(1010) == "one thousand ten"
    else:
        expected = source.split()[::-1] if task == "reverse" else sorted(source.split())
        assert target.split() == expected
    item = train[0]
    assert vocab_for(cfg).decode(item["target"][item["target"] != IGNORE].tolist()) == target


@pytest.mark.slow  # three CLI processes start up (~40 s on 2 idle cores)
def test_sample_and_export_commands_read_a_checkpoint(tmp_path):
    """Train 1 step, then `scaletrain sample` (greedy and 3 beams) prints one line per input, and `scaletrain
    export --format hf` writes a T5ForConditionalGeneration folder."""
    train = [sys.executable, "-m", "scaletrain.train", CONFIG, *SMALL, "--train.steps", "1", "--train.warmup_steps",
             "0", "--train.global_batch_size", "4", "--metrics.tensorboard", "false", "--eval.interval", "0",
             "--job.run_dir", str(tmp_path), "--job.name", "run"]  # fmt: skip
    subprocess.run(train, check=True, capture_output=True, timeout=600)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step-00000001")
    cli = [sys.executable, "-m", "scaletrain.cli"]
    for beams in ("1", "3"):
        done = subprocess.run(cli + ["sample", checkpoint, "--input", "c a b", "--input", "z y", "--beams", beams],
                              check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
        lines = done.stdout.strip().splitlines()
        assert [line.split("\t")[0] for line in lines] == ["c a b", "z y"], done.stdout
    subprocess.run(cli + ["export", checkpoint, "--format", "hf", "--out", str(tmp_path / "hf")], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"] and config["decoder_start_token_id"] == 257
