"""Generation: greedy is the argmax rollout, sampling is seeded, beam search finds the best continuation."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.trainer.generate import filter_logits, generate
from lmforge.trainer.model import GPT, GPTConfig


def peaked_model(vocab: int = 64, seed: int = 0, **overrides: object) -> GPT:
    """A random model with large weights, so next-token distributions are far from uniform."""
    values: dict[str, object] = dict(
        vocab_size=vocab, layers=2, width=32, heads=4, kv_heads=2, ffn_size=64, context_length=32
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**values))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def total_log_prob(model: GPT, prompt: list[int], continuations: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probs of each row of ``continuations`` after ``prompt``, by full forward."""
    seqs = torch.cat([torch.tensor(prompt).expand(len(continuations), -1), continuations], dim=1)
    logits, _ = model(seqs)
    log_probs = torch.log_softmax(logits[:, len(prompt) - 1 : -1].double(), dim=-1)
    return log_probs.gather(-1, continuations[..., None]).squeeze(-1).sum(-1)


def test_greedy_is_argmax_rollout() -> None:
    model = peaked_model()
    prompt = [3, 14, 15]
    new = generate(model, prompt, 10)
    seq = list(prompt)
    for _ in range(10):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert new == seq[len(prompt) :]


def test_greedy_stops_at_eos_and_includes_it() -> None:
    model = peaked_model()
    free = generate(model, [1, 2], 10)
    eos = free[4]
    stopped = generate(model, [1, 2], 10, eos_token_id=eos)
    assert stopped == free[: free.index(eos) + 1]


@pytest.mark.parametrize("beams", [25, 40])
def test_beam_search_finds_the_best_continuation(beams: int) -> None:
    vocab, new_tokens, prompt = 5, 3, [1, 4]
    model = peaked_model(vocab=vocab, seed=1)
    result = generate(model, prompt, new_tokens, strategy="beam", beams=beams)
    every = torch.tensor(list(itertools.product(range(vocab), repeat=new_tokens)))
    scores = total_log_prob(model, prompt, every)
    best = every[scores.argmax()].tolist()
    assert scores.max() - scores.topk(2).values[1] > 1e-4  # the optimum is unambiguous
    assert result == best


# (seed, eos) pairs whose best outputs end with EOS after 1 and 2 tokens, or run the full length.
@pytest.mark.parametrize(("seed", "eos"), [(0, 0), (0, 1), (3, 2), (4, 1), (5, 3)])
def test_beam_search_with_eos_finds_the_best_finished_or_full_hypothesis(seed: int, eos: int) -> None:
    vocab, new_tokens, prompt = 5, 3, [2]
    model = peaked_model(vocab=vocab, seed=seed)
    result = generate(model, prompt, new_tokens, strategy="beam", beams=25, eos_token_id=eos)
    # Every valid output: EOS only as the last token, or no EOS and full length. No length penalty.
    candidates: list[tuple[int, ...]] = []
    for length in range(1, new_tokens + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos in seq[:-1] or (length < new_tokens and seq[-1] != eos):
                continue
            candidates.append(seq)
    scored = {seq: total_log_prob(model, prompt, torch.tensor([seq])).item() for seq in candidates}
    best = max(scored, key=scored.__getitem__)
    assert result == list(best)


def test_one_beam_is_greedy() -> None:
    model = peaked_model()
    assert generate(model, [5, 6], 8, strategy="beam", beams=1) == generate(model, [5, 6], 8)


def test_beam_search_beats_or_ties_greedy() -> None:
    model = peaked_model(vocab=16, seed=3)
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, 6)
    beam = generate(model, prompt, 6, strategy="beam", beams=4)
    assert (
        total_log_prob(model, prompt, torch.tensor([beam]))
        >= total_log_prob(model, prompt, torch.tensor([greedy])) - 1e-6
    )


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = peaked_model()
    a = generate(model, [7], 20, strategy="sample", seed=123, temperature=1.5)
    b = generate(model, [7], 20, strategy="sample", seed=123, temperature=1.5)
    c = generate(model, [7], 20, strategy="sample", seed=124, temperature=1.5)
    assert a == b
    assert a != c


def test_top_k_one_is_greedy() -> None:
    model = peaked_model()
    assert generate(model, [9, 8], 12, strategy="sample", top_k=1, seed=0, temperature=2.0) == generate(
        model, [9, 8], 12
    )


def test_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    probs = filter_logits(logits, 1.0, 2, None)
    assert probs[0] == 0 and probs[2] == 0 and probs[1] > probs[3] > 0
    full = torch.softmax(logits, -1)  # [0.032, 0.644, 0.087, 0.237]
    assert (filter_logits(logits, 1.0, None, 0.6) > 0).tolist() == [False, True, False, False]
    assert (filter_logits(logits, 1.0, None, 0.7) > 0).tolist() == [False, True, False, True]
    torch.testing.assert_close(filter_logits(logits, 1.0, None, 1.0), full)
    assert filter_logits(logits, 100.0, None, None).max() < 0.3  # high temperature flattens


def test_top_p_sampling_stays_in_the_nucleus() -> None:
    model = peaked_model(vocab=16)
    prompt = [3]
    logits, _ = model(torch.tensor([prompt]))
    allowed = set(torch.nonzero(filter_logits(logits[0, -1], 1.0, None, 0.5)).flatten().tolist())
    firsts = {generate(model, prompt, 1, strategy="sample", top_p=0.5, seed=s)[0] for s in range(30)}
    assert firsts <= allowed


def test_length_and_argument_errors() -> None:
    model = peaked_model()  # context 32
    assert len(generate(model, [1] * 30, 2)) == 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1] * 30, 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 3, strategy="sample", temperature=0.0)
    with pytest.raises(ValueError, match="strategy"):
        generate(model, [1], 3, strategy="nope")  # type: ignore[arg-type]
    assert generate(model, [1], 0) == []


def test_generation_restores_training_mode() -> None:
    model = peaked_model(dropout=0.5).train()
    a = generate(model, [1, 2], 5)
    assert model.training
    assert a == generate(model.eval(), [1, 2], 5)
