"""The Llama-style GPT: shapes, causality, sliding window, loss masking, parameter counts, KV cache."""

from __future__ import annotations

import pytest
import torch

from lmforge.api.training import ModelShape
from lmforge.trainer.model import GPT, GPTConfig, KVCache


def tiny(**overrides: object) -> GPTConfig:
    values: dict[str, object] = dict(
        vocab_size=64, layers=2, width=32, heads=4, kv_heads=4, ffn_size=64, context_length=32
    )
    values.update(overrides)
    return GPTConfig(**values)  # type: ignore[arg-type]


def model_for(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_shapes_dense_and_gqa(kv_heads: int) -> None:
    model = model_for(tiny(kv_heads=kv_heads))
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 64) and logits.dtype == torch.float32
    assert loss is None
    _, loss = model(idx, torch.randint(0, 64, (3, 10)))
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    assert model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 8, 32)
    # A random model predicts roughly uniformly: loss near ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5


@pytest.mark.parametrize("window", [None, 4])
def test_causal(window: int | None) -> None:
    model = model_for(tiny(sliding_window=window, kv_heads=2))
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_sliding_window_ignores_tokens_outside_it() -> None:
    window = 4
    model = model_for(tiny(sliding_window=window, layers=1))
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    # With one layer, token i sees tokens i-3..i only: position 3 influences positions 3..6.
    torch.testing.assert_close(a[0, 7:], b[0, 7:], rtol=0, atol=0)
    assert not torch.allclose(a[0, 3:7], b[0, 3:7])
    # A dense model does see it.
    dense = model_for(tiny(layers=1))
    assert not torch.allclose(dense(idx)[0][0, 7:], dense(changed)[0][0, 7:])


def test_all_ignored_targets_give_zero_loss_with_graph() -> None:
    model = model_for(tiny()).train()
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, torch.full_like(idx, -100))
    assert loss is not None and torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_ignored_targets_are_left_out_of_the_mean() -> None:
    model = model_for(tiny())
    idx = torch.randint(0, 64, (1, 8))
    targets = torch.randint(0, 64, (1, 8))
    logits, _ = model(idx)
    masked = targets.clone()
    masked[0, :5] = -100
    _, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 5:], targets[0, 5:])
    torch.testing.assert_close(loss, expected)


def test_num_parameters_tied_and_untied() -> None:
    tied, untied = model_for(tiny()), model_for(tiny(tied_embeddings=False))
    assert untied.num_parameters() - tied.num_parameters() == 64 * 32
    assert tied.num_parameters(non_embedding=True) == untied.num_parameters(non_embedding=True)
    per_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert tied.num_parameters(non_embedding=True) == 2 * per_layer + 32
    assert tied.lm_head.weight is tied.embed_tokens.weight


def test_flops_per_token_formula() -> None:
    config = tiny(kv_heads=2, sliding_window=8)
    model = model_for(config)
    matmul = 2 * (32 * 32 * 2 + 2 * 32 * 16 + 3 * 32 * 64)
    assert model.flops_per_token() == 6 * matmul + 6 * 64 * 32 + 12 * 2 * 32 * 8
    assert model_for(tiny()).flops_per_token() == 6 * 2 * (4 * 32 * 32 + 3 * 32 * 64) + 6 * 64 * 32 + 12 * 2 * 32 * 32


def test_param_groups_decay_matrices_only() -> None:
    model = model_for(tiny(tied_embeddings=False))
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.embed_tokens.weight for p in decay["params"])


def test_residual_projections_are_scaled_at_init() -> None:
    model = model_for(tiny(layers=8, width=256, heads=4, kv_heads=4, ffn_size=512))
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 0.001


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_forward_matches_full_forward(window: int | None, kv_heads: int) -> None:
    config = tiny(kv_heads=kv_heads, sliding_window=window)
    model = model_for(config)
    idx = torch.randint(0, 64, (2, 20))
    full, _ = model(idx)
    cache = KVCache(config, batch_size=2, max_len=20)
    prefill, _ = model(idx[:, :7], cache=cache, start_pos=0)
    steps = [prefill]
    for pos in range(7, 20):
        logits, _ = model(idx[:, pos : pos + 1], cache=cache, start_pos=pos)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_cache_reorder_selects_and_expands_rows() -> None:
    config = tiny()
    cache = KVCache(config, batch_size=2, max_len=4)
    cache.keys[0][1] = 1.0
    cache.reorder(torch.tensor([1, 1, 0]))
    assert cache.keys[0].shape[0] == 3 and cache.values[1].shape[0] == 3
    assert cache.keys[0][0].eq(1).all() and cache.keys[0][1].eq(1).all() and cache.keys[0][2].eq(0).all()


def test_too_long_input_is_refused() -> None:
    model = model_for(tiny())
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_config_from_spec_and_dict_round_trip() -> None:
    shape = ModelShape.model_validate(
        {
            "layers": 3,
            "width": 64,
            "heads": 4,
            "kvHeads": 2,
            "contextLength": 128,
            "attention": {"type": "slidingWindow", "window": 16},
            "tiedEmbeddings": False,
            "ropeTheta": 500000.0,
        }
    )
    config = GPTConfig.from_spec(shape, vocab_size=300)
    assert config == GPTConfig(
        vocab_size=300,
        layers=3,
        width=64,
        heads=4,
        kv_heads=2,
        ffn_size=192,
        context_length=128,
        sliding_window=16,
        tied_embeddings=False,
        rope_theta=500000.0,
    )
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert GPTConfig.from_spec(ModelShape(), vocab_size=10).sliding_window is None
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="kv_heads"):
        tiny(kv_heads=3)


def test_dropout_only_in_training() -> None:
    model = model_for(tiny(dropout=0.5))
    idx = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
