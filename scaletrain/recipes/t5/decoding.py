"""Greedy and beam-search decoding through T5.forward's modes (so FSDP2, DDP and TP see every call).

No key/value cache: each new token re-runs the decoder over the prefix, which costs O(T^2) decoder positions
for T output tokens and is nothing at the lengths this recipe trains. Greedy runs a fixed number of steps, so
every rank of a sharded model calls forward equally often.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def greedy(model: nn.Module, input_BS: torch.Tensor, max_len: int, pad: int, eos: int) -> torch.Tensor:
    """[B, max_len] ids: the most likely token at each step, pad after eos."""
    memory_BSD = model(input_BS, mode="encode")
    out_BT = torch.full((input_BS.shape[0], 1), pad, dtype=torch.long, device=input_BS.device)
    done_B = torch.zeros(input_BS.shape[0], dtype=torch.bool, device=input_BS.device)
    for _ in range(max_len):
        next_B = model(input_BS, out_BT, memory_BSD, mode="decode").argmax(-1)
        next_B = next_B.masked_fill(done_B, pad)
        done_B |= next_B == eos
        out_BT = torch.cat([out_BT, next_B[:, None]], dim=1)
    return out_BT[:, 1:]


@torch.no_grad()
def beam_search(
    model: nn.Module, input_1S: torch.Tensor, beams: int, max_len: int, pad: int, eos: int,
    length_penalty: float = 1.0,
) -> list[int]:  # fmt: skip
    """The best of `beams` hypotheses for one input, scored by log-probability / length**length_penalty.

    As Hugging Face's beam search (early_stopping=False): each step ranks the 2*beams best extensions; one
    that ends in eos within the first `beams` ranks joins the finished (the best `beams` are kept), the others
    continue as the `beams` alive hypotheses. The search stops when `beams` have finished and the best alive
    one's score so far is below the worst finished, or at max_len (unfinished ones then count too)."""
    memory_1SD = model(input_1S, mode="encode")
    alive: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_len):
        prefix_NT = torch.tensor([[pad, *seq] for _, seq in alive], device=input_1S.device)
        n = len(alive)
        logits_NV = model(input_1S.expand(n, -1), prefix_NT, memory_1SD.expand(n, -1, -1), mode="decode")
        scores_NV = torch.tensor([s for s, _ in alive], device=input_1S.device)[:, None]
        scores_NV = scores_NV + F.log_softmax(logits_NV.float(), dim=-1)
        top = scores_NV.flatten().topk(min(2 * beams, scores_NV.numel()))
        extended = []
        for rank, (score, index) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            row, token = divmod(index, scores_NV.shape[1])
            seq = alive[row][1] + [token]
            if token == eos:
                if rank < beams:
                    finished.append((score / len(seq) ** length_penalty, seq))
            elif len(extended) < beams:
                extended.append((score, seq))
        finished = sorted(finished, key=lambda pair: pair[0], reverse=True)[:beams]
        if not extended:
            break
        alive = extended
        best_alive = alive[0][0] / len(alive[0][1]) ** length_penalty
        if len(finished) == beams and best_alive < finished[-1][0]:
            break
    if not finished:
        finished = [(score / len(seq) ** length_penalty, seq) for score, seq in alive]
    return max(finished, key=lambda pair: pair[0])[1]
