"""Export a trained model as a Hugging Face model directory, and read it back.

The directory loads with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` offline (Llama, or
Mistral for sliding-window attention) and with :func:`load_model` here. The files are written by hand
(JSON and safetensors) so the trainer image needs no ``transformers``.

=====================  ============================================================================
model.safetensors      weights under LlamaForCausalLM's names (no lm_head.weight when tied)
config.json            LlamaForCausalLM / MistralForCausalLM configuration
generation_config.json bos/eos ids for ``model.generate``
tokenizer.json         the tokenizer, copied
tokenizer_config.json  makes AutoTokenizer build a fast tokenizer from tokenizer.json
special_tokens_map.json
lmforge_model.json     GPTConfig.to_dict() plus format_version, read by load_model
=====================  ============================================================================
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import load_file, save_file

from lmforge import contract
from lmforge.trainer.model import GPT, GPTConfig

FORMAT_VERSION = 1
HF_PREFIX = "model."  # LlamaForCausalLM nests everything but lm_head under LlamaModel, named "model"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names: ours are LlamaForCausalLM's without the ``model.`` prefix."""
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tied_embeddings:  # tied: transformers re-ties it from embed_tokens
                weights[name] = tensor.detach().cpu().contiguous()
        else:
            weights[HF_PREFIX + name] = tensor.detach().cpu().contiguous()
    return weights


def _hf_config(config: GPTConfig, dtype: torch.dtype, bos_id: int | None, eos_id: int) -> dict[str, Any]:
    mistral = config.sliding_window is not None
    hf: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "initializer_range": 0.02,
        "rms_norm_eps": config.norm_eps,
        # rope_theta for transformers 4.x, rope_parameters for 5.x.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tied_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
        "use_cache": True,
    }
    if mistral:
        hf["sliding_window"] = config.sliding_window
    return hf


def _token_id(tokenizer: tokenizers.Tokenizer, token: str, role: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary; pass the right {role}")
    return token_id


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_model(
    model: GPT,
    tokenizer_json: str | Path,
    out_dir: str | Path,
    *,
    bos_token: str | None = None,
    eos_token: str = "<|endoftext|>",
) -> Path:
    """Write ``model`` and its tokenizer to the local directory ``out_dir`` (created); return it.

    Weights keep the model's dtype (fp32, bf16 or fp16).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    eos_id = _token_id(tokenizer, eos_token, "eos_token")
    bos_id = _token_id(tokenizer, bos_token, "bos_token") if bos_token is not None else None
    config = model.config
    dtype = next(model.parameters()).dtype

    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", _hf_config(config, dtype, bos_id, eos_id))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id},
    )
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    special = {"eos_token": eos_token} | ({"bos_token": bos_token} if bos_token is not None else {})
    _write_json(
        out / "tokenizer_config.json",
        # PreTrainedTokenizerFast reads tokenizer.json as is: no BOS added, same ids as `tokenizers`.
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.context_length,
            "clean_up_tokenization_spaces": False,
            "bos_token": bos_token,
            "eos_token": eos_token,
        },
    )
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / contract.MODEL_META, {"format_version": FORMAT_VERSION, **config.to_dict()})
    return out


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[GPT, tokenizers.Tokenizer]:
    """Read an exported directory back into our GPT (eval mode, the saved dtype) and its tokenizer."""
    directory = Path(model_dir)
    meta_path = directory / contract.MODEL_META
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not an exported lmforge model (no lmforge_model.json)")
    meta = json.loads(meta_path.read_text())
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {version}; this lmforge reads {FORMAT_VERSION}")
    config = GPTConfig.from_dict(meta)

    weights = load_file(str(directory / "model.safetensors"), device=device)
    state = {name.removeprefix(HF_PREFIX): tensor for name, tensor in weights.items()}
    if config.tied_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model = GPT(config).to(device=device, dtype=state["embed_tokens.weight"].dtype)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    return model, tokenizer
