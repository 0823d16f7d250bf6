"""Export: the directory loads in transformers (same logits, same tokenization) and back into our GPT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.trainer.export import export_model, load_model
from lmforge.trainer.generate import generate
from lmforge.trainer.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token from the ones before it.",
    "Rotary positions rotate queries and keys by an angle that grows with position.",
    "Grouped-query attention shares each key and value head among several query heads.",
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE trained on a few sentences, with <|endoftext|> as its only special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SENTENCES * 5, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def random_model(vocab: int, seed: int = 0, **overrides: object) -> GPT:
    values: dict[str, object] = dict(
        vocab_size=vocab,
        layers=2,
        width=32,
        heads=4,
        kv_heads=4,
        ffn_size=64,
        context_length=64,
        rope_theta=500.0,
        norm_eps=1e-6,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**values))  # type: ignore[arg-type]
    with torch.no_grad():  # perturb the norm gains too, so a mix-up of the two norms would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


CASES = {
    "tied": {},
    "untied": {"tied_embeddings": False},
    "gqa": {"kv_heads": 2, "tied_embeddings": False},
    "mqa-tied": {"kv_heads": 1},
    "sliding-window": {"kv_heads": 2, "sliding_window": 8},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_the_export_with_the_same_logits(case: str, tokenizer_json: Path, tmp_path: Path) -> None:
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size()
    model = random_model(vocab, **CASES[case])
    out = export_model(model, tokenizer_json, tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("mistral" if "sliding_window" in CASES[case] else "llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == config["architectures"][0]
    ids = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        theirs = hf(ids).logits
        ours, _ = model(ids)
    assert (theirs - ours).abs().max().item() <= 1e-4
    weights = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in weights) == (not model.config.tied_embeddings)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in weights.values())


def test_autotokenizer_encodes_like_our_tokenizer(tokenizer_json: Path, tmp_path: Path) -> None:
    ours = Tokenizer.from_file(str(tokenizer_json))
    out = export_model(random_model(ours.get_vocab_size()), tokenizer_json, tmp_path / "model")
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert theirs.is_fast
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.token_to_id("<|endoftext|>")
    for text in [*SENTENCES, "unseen wörds ünïcode 🙂<|endoftext|>next", "  spaces\tand\nnewlines "]:
        assert theirs(text)["input_ids"] == ours.encode(text).ids
        assert theirs.decode(ours.encode(text).ids) == ours.decode(ours.encode(text).ids, skip_special_tokens=False)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("case", ["tied", "gqa", "sliding-window"])
def test_load_model_round_trips_bit_exactly(case: str, tokenizer_json: Path, tmp_path: Path) -> None:
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size()
    model = random_model(vocab, **CASES[case])
    out = export_model(model, tokenizer_json, tmp_path / "model")
    loaded, tokenizer = load_model(out)
    assert loaded.config == model.config and not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    if model.config.tied_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, vocab, (1, 16))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert tokenizer.to_str() == Tokenizer.from_file(str(tokenizer_json)).to_str()
    prompt = tokenizer.encode("The quick").ids
    assert generate(loaded, prompt, 5) == generate(model, prompt, 5)


def test_bf16_export_keeps_dtype(tokenizer_json: Path, tmp_path: Path) -> None:
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size()
    model = random_model(vocab).to(torch.bfloat16)
    out = export_model(model, tokenizer_json, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_model(out)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_unknown_special_token_is_refused(tokenizer_json: Path, tmp_path: Path) -> None:
    model = random_model(Tokenizer.from_file(str(tokenizer_json)).get_vocab_size())
    with pytest.raises(ValueError, match="eos_token"):
        export_model(model, tokenizer_json, tmp_path / "model", eos_token="</s>")


def test_load_model_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="lmforge_model.json"):
        load_model(tmp_path)
