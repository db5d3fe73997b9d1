"""Named LoRA adapters on a frozen causal language model (SmolLM2, any Llama-, Qwen2- or GPT-2-style model).

`CausalLMAdapterModel` is an `AdapterModel` whose task is next-token prediction: the base keeps its own
language-model head, adapters carry no classification head, and `forward` returns the loss over the labelled
tokens first, as Hugging Face models do, so `train.run_loop` and `transformers.Trainer` both train it. The
injection, fake quantization, merge and adapter switching are `AdapterModel`'s own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelora.config import AdapterConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel, load_causal_lm

IGNORE_INDEX = -100  # label of a token the loss skips (prompt, padding), as Hugging Face and PyTorch use it


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of labelled tokens) of next-token prediction.

    logits (batch, seq, vocab) at position t predict labels[:, t + 1]; labels equal to IGNORE_INDEX count for
    nothing. The count comes back as a float tensor so a caller can sum it over processes.
    """
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (batch * (seq - 1), vocab)
    target = labels[:, 1:].reshape(-1).to(logits.device).long()
    summed = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed, (target != IGNORE_INDEX).sum().to(summed.dtype)


class CausalLMAdapterModel(AdapterModel):
    """A frozen causal LM with named LoRA adapters, one active; LoRA goes into q/k/v/o unless told otherwise.

    Example:
        >>> model = CausalLMAdapterModel.from_base("smollm2")
        >>> model.add_adapter("home", LoraConfig(r=8), quant=QuantConfig(weight_block=32))
        >>> loss, logits = model(input_ids, attention_mask, labels=labels)  # doctest: +SKIP
    """

    task = "causal-lm"

    @classmethod
    def from_base(cls, base: str) -> CausalLMAdapterModel:
        """Load `smollm2` or a Hugging Face causal-LM directory (never downloads) and wrap it."""
        module, path = load_causal_lm(base)
        model = cls(module)
        model.base_path = path
        return model

    def __init__(self, base: nn.Module) -> None:
        if not callable(getattr(base, "get_output_embeddings", None)) or base.get_output_embeddings() is None:
            raise EdgeloraError(f"{type(base).__name__} has no language-model head; load the base with "
                                "edgelora.model.load_causal_lm (AutoModelForCausalLM), not load_base")
        super().__init__(base)
        self.base_path = None

    def add_adapter(self, name: str, config: AdapterConfig, labels: list[str] | None = None,
                    quant: QuantConfig | None = None) -> None:
        """Inject adapter `name` (LoRA; the base's own LM head predicts the tokens, so there are no labels)."""
        if labels:
            raise EdgeloraError(f"adapter {name!r}: a causal-LM adapter predicts tokens and takes no labels, "
                                f"got {len(labels)}")
        if not isinstance(config, LoraConfig):
            raise EdgeloraError(f"adapter {name!r}: causal-LM adapters are LoRA (PEFT CAUSAL_LM layout); "
                                f"got a {config.kind} adapter")
        self._check_new_name(name)
        self._inject(name, config, quant)
        self.set_adapter(name)

    def output_layer_name(self) -> str:
        """The module name of the LM head (`lm_head`), which the int8 export quantizes like every other linear."""
        head = self.base.get_output_embeddings()
        for name, module in self.base.named_modules():
            if module is head:
                return name
        raise EdgeloraError(f"cannot find the LM head of {type(self.base).__name__}")

    def quantizable_names(self) -> list[str]:
        names = super().quantizable_names()
        head = self.output_layer_name()
        if head not in names:
            names.append(head)
        return names

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """(logits,); with `labels` (token ids, IGNORE_INDEX where no loss), (loss, logits) with the mean
        cross-entropy over the labelled tokens first, so a `transformers.Trainer` trains this model as it is."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = out.logits  # (batch, seq, vocab)
        if labels is None:
            return (logits,)
        summed, count = token_loss(logits, labels)
        return summed / count.clamp(min=1.0), logits
