"""A frozen base model with named adapters and one task head per adapter.

`AdapterModel` wraps a Hugging Face encoder or decoder (or any `nn.Module` of `nn.Linear`s), swaps the
targeted linears for `AdaptedLinear` in place (wrap, don't rebuild), and gives each adapter a head over the
last hidden state: ours mean-pools it, an architecture's head (`edgelora.heads`) pools as transformers does.
An adapter without labels has no head: it changes the embeddings only.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgelora.config import AdapterConfig, BottleneckConfig, LoraConfig, QuantConfig, check_recipe, layer_recipe
from edgelora.embedded import EMBEDDED, MINILM, embedded_path
from edgelora.errors import EdgeloraError
from edgelora.heads import MEAN_POOLED, activation, head_kind, pool
from edgelora.layers import ADAPTER_KEYS, AdaptedLinear
from edgelora.runtime.bundle import ADAPTER_NAME, ADAPTER_NAME_RULE

DEFAULT_BASE = MINILM


@dataclass(frozen=True)
class ArchTargets:
    """Regexes (matched at the end of a module name) for one architecture's linear layers."""

    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    attn_out: str
    ffn_out: str


_BERT = ArchTargets(
    attention=(r"attention\.self\.(query|key|value)", r"attention\.output\.dense"),
    mlp=(r"intermediate\.dense", r"layer\.\d+\.output\.dense"),
    attn_out=r"attention\.output\.dense",
    ffn_out=r"layer\.\d+\.output\.dense",
)
ARCH_TARGETS: dict[str, ArchTargets] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": ArchTargets(
        (r"attention\.(q_lin|k_lin|v_lin|out_lin)",), (r"ffn\.lin1", r"ffn\.lin2"), r"attention\.out_lin", r"ffn\.lin2"
    ),
    "gpt2": ArchTargets((r"attn\.c_attn", r"attn\.c_proj"), (r"mlp\.c_fc", r"mlp\.c_proj"), r"attn\.c_proj", r"mlp\.c_proj"),
    "llama": ArchTargets(
        (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",),
        (r"mlp\.(gate_proj|up_proj|down_proj)",),
        r"self_attn\.o_proj",
        r"mlp\.down_proj",
    ),
}
ARCH_TARGETS["mistral"] = ARCH_TARGETS["qwen2"] = ARCH_TARGETS["llama"]


def resolve_base_path(base: str | Path) -> Path:
    """`minilm` and `smollm2` are the embedded bases (`edgelora.embedded`); anything else is a directory."""
    if str(base) in EMBEDDED:
        return embedded_path(str(base))
    path = Path(base)
    if not path.exists():
        raise EdgeloraError(
            f"{path}: base model directory does not exist; give a Hugging Face model directory or one of {EMBEDDED}"
        )
    if not (path / "config.json").is_file():
        raise EdgeloraError(f"{path}: not a Hugging Face model directory (no config.json); give the folder from save_pretrained")
    return path


def _from_pretrained(auto_class, path: Path) -> nn.Module:
    """Load with a transformers Auto class from disk only, eager attention, fp32, eval mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our CLI draws its own; theirs would interleave with it
    from safetensors import SafetensorError

    try:
        model, info = auto_class.from_pretrained(path, attn_implementation="eager", local_files_only=True,
                                                 output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # RuntimeError: weights of another shape
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgeloraError(f"{path}: could not load the base model ({first}); check the files or re-save it") from exc
    missing = set(info.get("missing_keys") or ())
    if missing and all(k.startswith("pooler.") for k in missing) and getattr(model, "pooler", None) is not None:
        # A checkpoint without a pooler (RoBERTa's, a classifier's backbone): transformers would make a random
        # one at every load, and the base's fingerprint with it. Nothing here uses it; a head that needs
        # it (BERT's pooler) is refused by name.
        model.pooler = None
    model.float().eval()
    return model


def load_base(base: str | Path) -> tuple[nn.Module, Path]:
    """Load a Hugging Face model (no head) from disk, eager attention, fp32, eval mode; never downloads."""
    from transformers import AutoModel

    path = resolve_base_path(base)
    return _from_pretrained(AutoModel, path), path


def load_causal_lm(base: str | Path) -> tuple[nn.Module, Path]:
    """Load a Hugging Face causal LM with its language-model head (`smollm2` or a directory); never downloads."""
    from transformers import AutoModelForCausalLM

    path = resolve_base_path(base)
    return _from_pretrained(AutoModelForCausalLM, path), path


def fingerprint(module: nn.Module) -> str:
    """sha256 over the base weights (names, shapes, bytes): ties adapters and bundles to the exact base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(module).items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The base's own weights under their original names, with every adapter and wrapper level removed."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        if any(part in name for part in ADAPTER_KEYS):
            continue
        out[name.replace(".base.", ".")] = tensor
    return out


def model_type(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None)


def hidden_size(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    for attr in ("hidden_size", "n_embd", "dim", "d_model"):
        if config is not None and isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise EdgeloraError(f"cannot tell the hidden size of {type(module).__name__}; give a Hugging Face model")


def max_positions(module: nn.Module) -> int | None:
    """How many token positions the base can embed (None: no fixed limit known)."""
    config = getattr(module, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            if model_type(module) in ("roberta", "xlm-roberta"):  # positions start after the padding index
                value -= (getattr(config, "pad_token_id", None) or 1) + 1
            return value
    return None


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D stores its weight as (in, out); an equal `nn.Linear` holds the transpose."""
    weight = conv.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias.detach())
    return linear.to(weight.device)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(rf"(^|\.)({p})$", name) for p in patterns)


def _last_hidden(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None) -> torch.Tensor:
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return base(**kwargs).last_hidden_state  # (batch, seq, hidden)


class AdapterModel(nn.Module):
    """Frozen base + named adapters + a head per adapter; `forward` returns (logits, pooled embeddings).

    A head is `heads[name]` (the linear classifier), preceded for the architecture heads of
    `edgelora.heads` by a dense layer `head_dense[name]` and an activation; `head_kinds[name]` says which.

    Example:
        >>> base, _ = load_base("minilm")
        >>> model = AdapterModel(base)
        >>> model.add_adapter("intent", LoraConfig(r=8), labels=["on", "off"], quant=QuantConfig(weight_bits=7))
        >>> model.set_adapter("intent")
    """

    task = "classification"  # what `forward` computes; `edgelora.causal_lm` adds "causal-lm"

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_fingerprint = fingerprint(base)
        self.base = base
        self.heads = nn.ModuleDict()
        self.head_dense = nn.ModuleDict()  # the dense layer before the classifier, for heads that have one
        self.head_kinds: dict[str, str] = {}
        self.labels: dict[str, list[str]] = {}
        self.configs: dict[str, AdapterConfig] = {}
        self.quant: QuantConfig | None = None
        self.active: str | None = None
        for p in base.parameters():
            p.requires_grad_(False)

    # --- which layers -------------------------------------------------------------------------------
    def _targets(self) -> ArchTargets | None:
        return ARCH_TARGETS.get(model_type(self.base) or "")

    def quantizable_names(self) -> list[str]:
        """Linears the int8 export quantizes: every attention and MLP projection (all linears for plain modules)."""
        targets = self._targets()
        names: list[str] = []
        for name, module in self.base.named_modules():
            if any(name.startswith(n + ".") for n in names):
                continue  # inside a wrapper: its base linear and adapter weights
            if not (_is_linear_like(module) or isinstance(module, AdaptedLinear)):
                continue
            if targets is None or _matches(name, targets.attention + targets.mlp):
                names.append(name)
        return names

    def _lora_target_names(self, config: LoraConfig) -> list[str]:
        targets = self._targets()
        if config.target_modules is not None:
            patterns = tuple(re.escape(t) for t in config.target_modules)
        elif targets is not None:
            patterns = targets.attention + (targets.mlp if config.include_mlp else ())
        else:
            patterns = (r".*",)
        names = [n for n in self.quantizable_names() if _matches(n, patterns)]
        if not names:
            raise EdgeloraError(
                f"target_modules={config.target_modules} matched no linear layer of {type(self.base).__name__}; "
                "give module-name suffixes such as 'query' or 'attention.self.value'"
            )
        return names

    def _bottleneck_target_names(self, config: BottleneckConfig) -> list[str]:
        targets = self._targets()
        if targets is None:
            raise EdgeloraError(
                f"bottleneck adapters need a known architecture ({', '.join(sorted(ARCH_TARGETS))}); "
                f"got {type(self.base).__name__}"
            )
        patterns = (targets.ffn_out,) + ((targets.attn_out,) if config.placement == "houlsby" else ())
        return [n for n in self.quantizable_names() if _matches(n, patterns)]

    def _wrap(self, name: str) -> AdaptedLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.base.get_submodule(parent_name) if parent_name else self.base
        module = getattr(parent, child)
        if isinstance(module, AdaptedLinear):
            return module
        linear = module if isinstance(module, nn.Linear) else _linear_from_conv1d(module)
        wrapped = AdaptedLinear(linear)
        wrapped.quant = self._layer_quant(name)
        wrapped.active = self.active
        setattr(parent, child, wrapped)
        return wrapped

    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLinear]]:
        for name, module in self.base.named_modules():
            if isinstance(module, AdaptedLinear):
                yield name, module

    # --- adapters ------------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, config: AdapterConfig, labels: list[str], quant: QuantConfig | None = None,
        head: str = MEAN_POOLED,
    ) -> None:
        """Inject adapter `name` with a fresh head over `labels`; `quant` sets the fake-quant recipe of the model.

        Args:
            labels: the classes; empty for an adapter without a head (it changes the embeddings only).
            head: the head's kind (`edgelora.heads.HEAD_KINDS`): ours mean-pools; "bert-pooler" starts
                from the base's own pooler, which stays frozen.
        """
        self._check_new_name(name)
        if len(labels) == 1:
            raise EdgeloraError(f"adapter {name!r} needs at least 2 labels, got {len(labels)}")
        kind = head_kind(head)
        dense_src = None
        if labels and kind.dense_from_base:
            dense_src = getattr(getattr(self.base, "pooler", None), "dense", None)
            if not isinstance(dense_src, nn.Linear):
                raise EdgeloraError(f"adapter {name!r}: head {head!r} needs the base's pooler, and "
                                    f"{type(self.base).__name__} has none; use head 'mean-pooled'")
        self._inject(name, config, quant)
        if labels:
            ref = next(self.base.parameters())
            width = hidden_size(self.base)
            self.heads[name] = nn.Linear(width, len(labels), bias=kind.bias).to(ref.device)
            if kind.activation is not None:
                dense = nn.Linear(width, width).to(ref.device)
                if dense_src is not None:
                    dense.load_state_dict(dense_src.state_dict())
                self.head_dense[name] = dense
            self.head_kinds[name] = head
        self.labels[name] = list(labels)
        self.set_adapter(name)

    def _check_new_name(self, name: str) -> None:
        if not ADAPTER_NAME.fullmatch(name or ""):
            raise EdgeloraError(f"adapter name {name!r} must be {ADAPTER_NAME_RULE}")
        if name in self.configs:
            raise EdgeloraError(f"adapter {name!r} already exists; delete it first or pick another name")

    def _inject(self, name: str, config: AdapterConfig, quant: QuantConfig | None) -> None:
        """Put adapter `name` into its target layers (wrapping them on first use) and record its config; the
        one injection every task shares (`edgelora.causal_lm.CausalLMAdapterModel` adds no head)."""
        check_recipe(config, quant if quant is not None else self.quant)
        if quant is not None:
            self.set_quant(quant)
        if isinstance(config, LoraConfig):
            for layer_name in self._lora_target_names(config):
                self._wrap(layer_name).add_lora(name, config, config.rank_for(layer_name))
        else:
            for layer_name in self._bottleneck_target_names(config):
                self._wrap(layer_name).add_bottleneck(name, config)
        self.configs[name] = config

    def set_quant(self, quant: QuantConfig | None) -> None:
        """Fake-quantize every quantizable linear with `quant` (None turns fake quantization off)."""
        self.quant = quant
        if quant is not None:
            for layer_name in self.quantizable_names():
                self._wrap(layer_name)
        for name, layer in self.adapted_layers():
            layer.quant = self._layer_quant(name)

    def _layer_quant(self, name: str) -> QuantConfig | None:
        """The model's recipe for one layer: None (fp32) for the recipe's `skip_layers`; under the rowwise scheme,
        the blockwise recipe for its `block_layers` and the pure rowwise one elsewhere (`config.layer_recipe`)."""
        return layer_recipe(self.quant, name)

    def set_adapter(self, name: str | None) -> None:
        """Activate one adapter (None: the plain base); only its weights and head train."""
        if name is not None and name not in self.configs:
            raise EdgeloraError(f"unknown adapter {name!r}; this model has {sorted(self.configs) or 'none'}")
        self.active = name
        for _, layer in self.adapted_layers():
            layer.active = name
        for adapter, head in self.heads.items():
            head.requires_grad_(adapter == name)
        for adapter, dense in self.head_dense.items():  # BERT's pooler is the base's: frozen as the base is
            dense.requires_grad_(adapter == name and not head_kind(self.head_kinds[adapter]).dense_from_base)
        for _, layer in self.adapted_layers():
            for table in (layer.lora_A, layer.lora_B, layer.bottleneck):
                for adapter, module in table.items():
                    module.requires_grad_(adapter == name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        previous = self.active
        self.set_adapter(None)
        try:
            yield
        finally:
            self.set_adapter(previous)

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise EdgeloraError(f"unknown adapter {name!r}; this model has {sorted(self.configs) or 'none'}")
        for _, layer in self.adapted_layers():
            layer.delete(name)
        if name in self.heads:  # a causal-LM or embeddings adapter has none
            del self.heads[name]
        if name in self.head_dense:
            del self.head_dense[name]
        self.head_kinds.pop(name, None)
        self.labels.pop(name, None)
        del self.configs[name]
        if self.active == name:
            self.set_adapter(None)

    def merge(self) -> None:
        for _, layer in self.adapted_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.adapted_layers():
            layer.unmerge()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- forward -------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The base's last hidden state, (batch, seq, hidden)."""
        return _last_hidden(self.base, input_ids, attention_mask, token_type_ids)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the last hidden state over real tokens (what sentence-transformers does for MiniLM)."""
        return pool(_last_hidden(self.base, input_ids, attention_mask, token_type_ids), attention_mask, "mean")

    def head_kind(self, name: str) -> str | None:
        """The kind of adapter `name`'s head (`edgelora.heads.HEAD_KINDS`); None for an adapter without one."""
        return self.head_kinds.get(name) if name in self.heads else None

    def classify(self, name: str, hidden: torch.Tensor, attention_mask: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter `name`'s logits from the last hidden state (batch, seq, hidden): its head's pooling, dense
        layer and classifier. `pooled`: the mean-pooled rows when already computed. (batch, 0) without a head."""
        if name not in self.heads:
            return hidden.new_zeros(hidden.shape[0], 0)
        kind = head_kind(self.head_kinds.get(name, MEAN_POOLED))
        x = pooled if kind.token == "mean" and pooled is not None else pool(hidden, attention_mask, kind.token)
        if name in self.head_dense:
            x = activation(kind.activation)(self.head_dense[name](x))  # (batch, hidden)
        return self.heads[name](x)  # (batch, labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """(logits, pooled); with `labels` (class ids), (loss, logits, pooled) with the mean cross-entropy first,
        as Hugging Face models return it, so a `transformers.Trainer` trains this model as it is."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        pooled = pool(hidden, attention_mask, "mean")
        if self.active is None:
            logits = pooled.new_zeros(pooled.shape[0], 0)
        else:
            logits = self.classify(self.active, hidden, attention_mask, pooled)
        if labels is None:
            return logits, pooled
        if self.active is None:
            raise EdgeloraError("labels were given but no adapter is active; call set_adapter(name) first")
        if self.active not in self.heads:
            raise EdgeloraError(f"labels were given but adapter {self.active!r} has no head (it changes the embeddings "
                                "only); add the adapter with labels to classify")
        loss = torch.nn.functional.cross_entropy(logits.float(), labels.to(logits.device).long())
        return loss, logits, pooled
