"""Text continuation with the KV cache: greedy decoding, sampling (temperature, top-k, top-p) and beam search.

The prompt is prefilled once; every later step feeds only the newest token(s) and attends over the cache.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.trainer.model import GPT, KVCache

Strategy = Literal["greedy", "sample", "beam"]


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    strategy: Strategy = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beams: int = 4,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """The new token ids (not the prompt) continuing ``prompt_ids``.

    Generation stops after ``max_new_tokens`` or once ``eos_token_id`` is produced; the EOS token is
    included in the result so callers can tell the two apart. The prompt and the new tokens must fit the
    context together (no cropping, so every token is conditioned on the whole prompt): a larger
    ``max_new_tokens`` is a ValueError. ``temperature``, ``top_k``, ``top_p`` and ``seed`` apply to
    sampling, ``beams`` to beam search. The model runs in eval mode (no dropout) and is put back in its
    previous mode afterwards.
    """
    config = model.config
    if strategy not in ("greedy", "sample", "beam"):
        raise ValueError(f"strategy must be greedy, sample or beam, not {strategy!r}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; pass at least one token (e.g. the end-of-text token)")
    if any(not 0 <= i < config.vocab_size for i in prompt_ids):
        raise ValueError(f"prompt_ids must lie in [0, {config.vocab_size}) (the model's vocabulary)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    room = config.context_length - len(prompt_ids)
    if max_new_tokens > room:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) plus the prompt ({len(prompt_ids)} tokens) exceeds the "
            f"context length {config.context_length}; use max_new_tokens <= {max(room, 0)} or a shorter prompt"
        )
    if strategy == "sample":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if strategy == "beam" and beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    if max_new_tokens == 0:
        return []

    was_training = model.training
    model.eval()
    try:
        if strategy == "beam":
            return _beam_search(model, prompt_ids, max_new_tokens, beams, eos_token_id)
        return _decode(model, prompt_ids, max_new_tokens, strategy, temperature, top_k, top_p, eos_token_id, seed)
    finally:
        model.train(was_training)


def _prefill(model: GPT, prompt_ids: list[int], max_new_tokens: int) -> tuple[KVCache, Tensor]:
    """A cache sized for prompt + new tokens, filled with the prompt; and the last position's logits [1, V]."""
    param = next(model.parameters())
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, device=param.device, dtype=param.dtype)
    logits, _ = model(torch.tensor([prompt_ids], device=param.device), cache=cache, start_pos=0)
    return cache, logits[:, -1]


def filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Probabilities [V] after temperature, then top-k, then top-p (the smallest set reaching mass top_p)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first is always kept.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return F.softmax(logits, dim=-1)


def _decode(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    strategy: Strategy,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    seed: int | None,
) -> list[int]:
    """Greedy or sampled decoding, one token per step."""
    cache, logits = _prefill(model, prompt_ids, max_new_tokens)
    device = logits.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    new: list[int] = []
    position = len(prompt_ids)
    for step in range(max_new_tokens):
        if strategy == "greedy":
            token = int(logits[0].argmax())
        else:
            probs = filter_logits(logits[0], temperature, top_k, top_p)
            token = int(torch.multinomial(probs, 1, generator=generator))
        new.append(token)
        if token == eos_token_id or step == max_new_tokens - 1:
            break
        step_logits, _ = model(torch.tensor([[token]], device=device), cache=cache, start_pos=position)
        logits = step_logits[:, -1]
        position += 1
    return new


def _beam_search(
    model: GPT, prompt_ids: list[int], max_new_tokens: int, beams: int, eos_token_id: int | None
) -> list[int]:
    """The highest total log-prob continuation among those beam search keeps.

    Scores are plain sums of token log-probs, with no length penalty: a hypothesis that ends early with
    EOS competes with longer ones on its total, which favours shorter outputs. Each step keeps the best
    ``beams`` unfinished hypotheses; one that emits EOS is set aside as finished. Since log-probs are <= 0,
    scores only fall as hypotheses grow, so the search stops as soon as the best finished score is at least
    the best unfinished one. Hypotheses still open after ``max_new_tokens`` compete as they are.
    """
    cache, logits = _prefill(model, prompt_ids, max_new_tokens)
    device = logits.device
    log_probs = F.log_softmax(logits.float(), dim=-1)  # [alive, V]
    scores = torch.zeros(1, device=device)
    alive: list[list[int]] = [[]]
    finished: list[tuple[float, list[int]]] = []
    position = len(prompt_ids)
    for step in range(max_new_tokens):
        vocab = log_probs.shape[-1]
        totals = (scores[:, None] + log_probs).view(-1)
        # 2 x beams candidates always leave >= beams unfinished ones: at most one EOS per parent.
        top_scores, top_index = torch.topk(totals, min(totals.numel(), 2 * beams))
        next_alive: list[list[int]] = []
        next_scores: list[float] = []
        parents: list[int] = []
        for score, index in zip(top_scores.tolist(), top_index.tolist(), strict=True):
            parent, token = divmod(index, vocab)
            if token == eos_token_id:
                finished.append((score, alive[parent] + [token]))
            elif len(next_alive) < beams:
                next_alive.append(alive[parent] + [token])
                next_scores.append(score)
                parents.append(parent)
        alive, scores = next_alive, torch.tensor(next_scores, device=device)
        best_finished = max((s for s, _ in finished), default=float("-inf"))
        if not alive or step == max_new_tokens - 1 or best_finished >= next_scores[0]:
            break
        cache.reorder(torch.tensor(parents, device=device))
        step_logits, _ = model(torch.tensor(alive, device=device)[:, -1:], cache=cache, start_pos=position)
        log_probs = F.log_softmax(step_logits[:, -1], dim=-1)
        position += 1
    candidates = finished + list(zip(scores.tolist(), alive, strict=True))
    return max(candidates, key=lambda c: c[0])[1]
