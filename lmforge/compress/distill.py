"""Knowledge distillation into a smaller student.

Student: the teacher's GPTConfig with the spec's ``student`` fields overriding it. When the student
keeps the teacher's width, it starts from the teacher: embedding, final norm and head are copied,
and student block i is a copy of teacher block ``init_from_layers[i]`` (default every other layer:
``round(i x teacher_layers / student_layers)``); a tensor whose shape differs (fewer heads or FFN
channels) keeps its fresh initialisation and is listed in the report. A student of another width
starts from scratch.

Loss per token, over the targets that carry loss (not -100):
``alpha x T^2 x KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) x CE(student, y)``;
the T^2 keeps the KL gradient's scale independent of T (Hinton et al., 2015).

Training uses :func:`lmforge.compress.train.fit`: the trainer's DeepSpeed engine on a world of one
process (AdamW, warm-up + cosine); the batches come from the same SampleReader as training. Only the
student goes into the engine: the teacher stays a frozen plain module in eval mode, moved to the
training device for the step and back afterwards.

Pruning recovery (:func:`recover`) is the same loop with the unpruned model as the teacher: at
equal steps, matching the unpruned model's full distribution recovers more perplexity than
cross-entropy on the data alone (``distill: false`` keeps plain cross-entropy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.compress.train import FitResult, fit, training_device
from lmforge.trainer.model import GPT, IGNORE_INDEX, GPTConfig


@dataclass
class StudentInit:
    """How the student was initialised."""

    teacher_layers: list[int] | None
    copied: int = 0
    fresh: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.teacher_layers is None:
            return "student initialised from scratch (width differs from the teacher's)"
        text = f"student blocks from teacher layers {self.teacher_layers}; {self.copied} tensors copied"
        if self.fresh:
            text += f", {len(self.fresh)} freshly initialised (shape differs), e.g. {self.fresh[:2]}"
        return text


def student_config(teacher: GPTConfig, shape: Any) -> GPTConfig:
    """The teacher's config with the StudentShape's set fields (layers, width, heads, kv_heads, ffn_size)."""
    values = teacher.to_dict()
    for name in ("layers", "width", "heads", "kv_heads", "ffn_size"):
        value = getattr(shape, name, None)
        if value is not None:
            values[name] = value
    if getattr(shape, "heads", None) is not None and getattr(shape, "kv_heads", None) is None:
        if values["heads"] % values["kv_heads"]:
            values["kv_heads"] = values["heads"]
    if values["width"] != teacher.width or values["heads"] != teacher.heads:
        values.pop("head_size", None)  # a new shape gets the default head size (width / heads)
    return GPTConfig.from_dict(values)


def default_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Every other layer for a half-depth student; evenly spread in general."""
    return [min(teacher_layers - 1, round(i * teacher_layers / student_layers)) for i in range(student_layers)]


def make_student(teacher: GPT, shape: Any, *, seed: int = 0) -> tuple[GPT, StudentInit]:
    """A student GPT initialised from the teacher where the shapes allow (see the module docstring)."""
    config = student_config(teacher.config, shape)
    torch.manual_seed(seed)
    param = next(p for p in teacher.parameters() if p.dtype.is_floating_point)
    student = GPT(config).to(device=param.device)
    if config.width != teacher.config.width:
        return student, StudentInit(None)
    layers = getattr(shape, "init_from_layers", None) or default_layers(teacher.config.layers, config.layers)
    if len(layers) != config.layers:
        raise ValueError(
            f"student.initFromLayers has {len(layers)} entries for a {config.layers}-layer student; give one "
            "teacher layer per student layer"
        )
    bad = [i for i in layers if not 0 <= i < teacher.config.layers]
    if bad:
        raise ValueError(f"student.initFromLayers {bad} are not layers of the {teacher.config.layers}-layer teacher")
    source = _float_state(teacher)
    init = StudentInit(list(layers))
    state = student.state_dict()
    for name in state:
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            origin = f"layers.{layers[int(index)]}.{rest}"
        else:
            origin = name
        tensor = source.get(origin)
        if tensor is not None and tensor.shape == state[name].shape:
            state[name] = tensor.clone()
            init.copied += 1
        else:
            init.fresh.append(name)
    if config.tied_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    student.load_state_dict(state)
    return student, init


def _float_state(model: GPT) -> dict[str, Tensor]:
    """Float weights of a model (a quantized teacher's are dequantized)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "dequantize") and type(tensor) is not torch.Tensor:
            tensor = tensor.dequantize()
        if tensor.dtype.is_floating_point:
            state[name] = tensor.detach().float()
    return state


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, kl, ce) as in the module docstring."""
    vocab = student_logits.size(-1)
    keep = targets.reshape(-1) != IGNORE_INDEX
    s = student_logits.reshape(-1, vocab)[keep].float()
    t = teacher_logits.reshape(-1, vocab)[keep].float()
    ce = F.cross_entropy(s, targets.reshape(-1)[keep]) if keep.any() else s.sum() * 0
    kl = (
        F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.log_softmax(t / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    return alpha * kl + (1 - alpha) * ce, kl, ce


def distill(
    teacher: GPT,
    student: GPT,
    next_batch: Callable[[], tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float,
    temperature: float = 2.0,
    alpha: float = 0.5,
    log: Callable[[str], None] = lambda text: None,
) -> FitResult:
    """Train ``student`` in place against ``teacher`` through the DeepSpeed engine; the losses and engine."""
    if alpha == 0:
        result = fit(student, next_batch, steps, lr, log=log)
    else:
        with _frozen_on(teacher, training_device()):

            def loss_fn(engine: Any, x: Tensor, y: Tensor) -> Tensor:
                with torch.no_grad():
                    teacher_logits, _ = teacher(x)
                logits, _ = engine(x)
                total, _, _ = distillation_loss(logits, teacher_logits, y, temperature, alpha)
                return total

            result = fit(student, next_batch, steps, lr, loss_fn, log=log)
    result.extra.update(loss=_loss_text(temperature, alpha), temperature=temperature, alpha=alpha)
    return result


def recover(
    pruned: GPT,
    unpruned: GPT,
    next_batch: Callable[[], tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float,
    use_teacher: bool = True,
    temperature: float = 2.0,
    alpha: float = 0.5,
    log: Callable[[str], None] = lambda text: None,
) -> FitResult:
    """Recovery fine-tune of a pruned model, distilled from the unpruned one unless ``use_teacher`` is off."""
    return distill(
        unpruned,
        pruned,
        next_batch,
        steps=steps,
        lr=lr,
        temperature=temperature,
        alpha=alpha if use_teacher else 0.0,
        log=log,
    )


def _loss_text(temperature: float, alpha: float) -> str:
    if alpha == 0:
        return "cross-entropy"
    if alpha == 1:
        return f"KL(teacher || student) at T={temperature:g}"
    return f"{alpha:g} x KL(teacher || student) at T={temperature:g} + {1 - alpha:g} x cross-entropy"


@contextlib.contextmanager
def _frozen_on(teacher: GPT, device: torch.device) -> Iterator[None]:
    """The teacher in eval mode on ``device`` for the duration, then back where it was."""
    home = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    teacher.to(device)
    try:
        yield
    finally:
        teacher.to(home)
        teacher.train(was_training)
