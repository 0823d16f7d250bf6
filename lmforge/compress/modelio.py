"""Save and load compressed models.

A pruned or distilled model is an ordinary GPT with a smaller, consistent :class:`GPTConfig`, so it is
written with :func:`lmforge.trainer.export.export_model` and loads anywhere an exported model does
(``lmforge generate``, transformers).

A quantized model holds torchao tensor subclasses (or, in the fallback, ``torch.ao`` dynamically
quantized modules) that neither ``model.safetensors`` under Hugging Face names nor
:func:`~lmforge.trainer.export.load_model` understand. Its directory therefore holds:

================================  ==================================================================
model.quantized.safetensors       torchao: the subclasses flattened by torchao's safetensors support
                                  (qdata / scale / zero_point tensors + JSON metadata); no pickle
model.quantized.pt                torch.ao fallback: ``torch.save(state_dict)`` (pickled packed params)
lmforge_quantization.json         method, library, kernels, which modules were quantized
lmforge_model.json                GPTConfig, as for any exported model
tokenizer.json and friends        as for any exported model
================================  ==================================================================

and no ``config.json`` / ``model.safetensors``, so transformers fails plainly instead of loading
garbage. :func:`load_any` reads both kinds of directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.contract import MODEL_META
from lmforge.trainer.export import FORMAT_VERSION, export_model, load_model
from lmforge.trainer.model import GPT, GPTConfig

if TYPE_CHECKING:
    import tokenizers

QUANT_META = "lmforge_quantization.json"
TORCHAO_WEIGHTS = "model.quantized.safetensors"
TORCH_AO_WEIGHTS = "model.quantized.pt"
WEIGHT_FILES = ("model.safetensors", TORCHAO_WEIGHTS, TORCH_AO_WEIGHTS)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in an exported directory (what 'size on disk' means in the results)."""
    directory = Path(model_dir)
    return sum((directory / name).stat().st_size for name in WEIGHT_FILES if (directory / name).exists())


def save_float(model: GPT, tokenizer: tokenizers.Tokenizer, out_dir: str | Path) -> Path:
    """Export an unquantized (pruned, distilled or original) model; loads with ``load_model``."""
    with tempfile.TemporaryDirectory(prefix="lmforge-tok-") as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(tokenizer.to_str())
        eos = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else None
        if eos is None:
            raise ValueError("the tokenizer has no <|endoftext|> token")
        return export_model(model, path, out_dir)


def save_quantized(model: GPT, tokenizer: tokenizers.Tokenizer, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write a quantized model (see the module docstring); ``info`` goes to lmforge_quantization.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer files come from a float export of a tiny stand-in; only its weights/config are dropped.
    with tempfile.TemporaryDirectory(prefix="lmforge-q-") as tmp:
        stub = GPT(
            GPTConfig(
                vocab_size=model.config.vocab_size,
                layers=1,
                width=8,
                heads=1,
                kv_heads=1,
                ffn_size=8,
                context_length=model.config.context_length,
            )
        )
        save_float(stub, tokenizer, tmp)
        for name in _TOKENIZER_FILES:
            shutil.copyfile(Path(tmp) / name, out / name)
    (out / MODEL_META).write_text(
        json.dumps({"format_version": FORMAT_VERSION, **model.config.to_dict()}, indent=2) + "\n"
    )
    state = _dedup_tied(model)
    if info["library"] == "torchao":
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict(state)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out / TORCHAO_WEIGHTS), metadata=metadata)
    else:
        torch.save(state, out / TORCH_AO_WEIGHTS)
    (out / QUANT_META).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _dedup_tied(model: GPT) -> dict[str, torch.Tensor]:
    """state_dict without embed_tokens.weight when it is the same tensor as lm_head.weight."""
    state = model.state_dict()
    if model.embed_tokens.weight is model.lm_head.weight:
        state.pop("embed_tokens.weight", None)
    return state


def load_any(model_dir: str | Path, device: str = "cpu") -> tuple[GPT, tokenizers.Tokenizer, dict[str, Any] | None]:
    """Model, tokenizer and quantization info (None for a float model) of an exported directory."""
    import tokenizers

    directory = Path(model_dir)
    if not (directory / QUANT_META).exists():
        model, tok = load_model(directory, device=device)
        return model, tok, None
    info = json.loads((directory / QUANT_META).read_text())
    meta = json.loads((directory / MODEL_META).read_text())
    meta.pop("format_version", None)
    config = GPTConfig.from_dict(meta)
    model = GPT(config).eval()
    from lmforge.compress.quantize import apply_structure

    tied = info.get("tied_quantized", False)
    if info["library"] == "torchao":
        from lmforge.compress.quantize import quiet_torchao, torchao_available

        if not torchao_available():
            raise ModuleNotFoundError(
                f"{directory} was quantized with torchao {info.get('torchao_version', '')}; install it "
                f"(pip install torchao=={info.get('torchao_version', '0.18.0')}) to load it"
            )

        quiet_torchao()
        from safetensors import safe_open
        from safetensors.torch import load_file
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        tensors = load_file(str(directory / TORCHAO_WEIGHTS), device=device)
        with safe_open(str(directory / TORCHAO_WEIGHTS), framework="pt") as handle:
            metadata = handle.metadata()
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
        if leftover:
            raise ValueError(f"{directory / TORCHAO_WEIGHTS}: unrecognised tensors {sorted(leftover)[:3]}")
        result = model.load_state_dict(state, strict=False, assign=True)
    else:
        apply_structure(model, info)
        state = torch.load(directory / TORCH_AO_WEIGHTS, weights_only=False)  # our own file: packed params
        result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "embed_tokens.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{directory} does not match its {MODEL_META}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    if tied:
        model.embed_tokens.weight = model.lm_head.weight
    model.eval()
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    return model, tokenizer, info
