"""The run's starting model, made in one place for the run itself and for the LR range test.

Both must start from the same weights: the range test's best learning rate for a fine-tune is not
a fresh model's. The weights are random from ``training.seed`` (so the same on every rank) or
``model.initialModel``'s (finetune, continual), which must have this job's tokenizer and shape.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from lmforge.api.common import S3Settings
from lmforge.api.training import TrainingJobSpec
from lmforge.data.preparation import PreparedData
from lmforge.data.tokenizer import tokenizer_hash
from lmforge.trainer.export import load_model
from lmforge.trainer.model import GPT, GPTConfig
from lmforge.trainer.outputs import materialize
from lmforge.trainer.world import InvalidForThisRun


def build_model(spec: TrainingJobSpec, prepared: PreparedData) -> GPT:
    """A new model of ``spec.model``'s shape: seeded random weights, or ``model.initialModel``'s."""
    torch.manual_seed(spec.training.seed)
    model = GPT(GPTConfig.from_spec(spec.model, prepared.vocab_size))
    if spec.model.initial_model is not None:
        load_initial_weights(model, spec.model.initial_model, spec.s3, prepared.tokenizer)
    return model


def load_initial_weights(model: torch.nn.Module, uri: str, s3: S3Settings | None, tokenizer: Tokenizer) -> None:
    """Start from an exported model (finetune / continual): same tokenizer and shape required.

    Why the tokenizer check: a model trained with other merges but the same vocabulary size loads
    without complaint and then reads every token id as a different word; that would waste the whole
    run, so it is refused up front with the fix (exit 78).
    """
    directory = materialize(uri, s3)
    theirs_file = directory / "tokenizer.json"
    if theirs_file.is_file():
        theirs, ours = tokenizer_hash(Tokenizer.from_file(str(theirs_file))), tokenizer_hash(tokenizer)
        if theirs != ours:
            raise InvalidForThisRun(
                f"model.initialModel {uri} was trained with another tokenizer (hash {theirs}, this job's is "
                f"{ours}), so its embeddings belong to other token ids; set tokenizer.uri to "
                f"{uri.rstrip('/')}/tokenizer.json"
            )
    source, _ = load_model(directory)
    try:
        missing = model.load_state_dict(source.state_dict(), strict=False)
    except RuntimeError as exc:  # shape mismatches: a spec error, never worth a retry
        first = str(exc).strip().splitlines()[-1].strip()
        raise InvalidForThisRun(
            f"model.initialModel {uri} does not match spec.model ({first}); make spec.model the shape of that "
            "model (layers, width, heads, kvHeads, ffnSize) and tokenizer.vocabSize its vocabulary"
        ) from None
    if missing.missing_keys or missing.unexpected_keys:
        raise InvalidForThisRun(
            f"model.initialModel {uri} does not match spec.model: missing {missing.missing_keys[:3]}, "
            f"unexpected {missing.unexpected_keys[:3]}; make spec.model the shape of that model"
        )
