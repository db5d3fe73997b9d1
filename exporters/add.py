"""Put a trained adapter into an existing switchable bundle, base untouched.

The adapter's tensors (read from its directory, no base model needed) are checked against the bundle:
its base fingerprint against the manifest, every tensor against the graph's adapter inputs, its layers
against the layers that have slots. Then the bundle is rewritten as a whole by the one bundle writer
(`edgelora.runtime.bundle.write_bundle`: unchanged files hard-linked into a temporary sibling, the new `.onnx_adapter`, the
rebuilt adapter bank, the manifest last) and renamed into place, so a failure leaves the bundle as it was.
With the base at hand the new adapter is also run through the graph and compared with torch, as
`edgelora export` does.

torch, onnx and the exporter are imported inside the functions. The `edgelora add-adapter` verb (arguments,
printing) lives in edgelora/cli/export.py.

Example:
    >>> add_adapters("bundles/sw8", {"topic": "runs/topic"})  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import (
    CAUSAL_LM,
    ADAPTER_NAME,
    ADAPTER_NAME_RULE,
    BANK_FILE,
    MEAN_POOLED,
    MODEL_FILE,
    PER_TOKEN,
    TOKEN_CLASSIFICATION,
    AdapterEntry,
    Bank,
    Manifest,
    read_manifest,
    sha256_file,
    write_bundle,
)

if TYPE_CHECKING:
    import onnx

    from .switchable import SlotSpec

_LAYER_WEIGHT = re.compile(r"^model\.base\.(.+)\.(?:weight_t|weight_q)$")


def add_adapters(
    bundle: str | Path,
    adapters: Mapping[str, str | Path],
    *,
    base: str | Path | None = None,
    check: bool = True,
    replace: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Add `adapters` (name -> adapter directory) to switchable `bundle`; the base graph is not touched.

    Args:
        base: the base model, to run each new adapter through the graph against torch before writing;
            None: the base the manifest names. The model must have the manifest's fingerprint.
        check: False skips that comparison (no base needed); the shape checks always run.
        replace: allow replacing an adapter of the same name; otherwise that is refused.

    Returns the bundle's new manifest.
    """
    bundle = Path(bundle)
    say = progress or (lambda _msg: None)
    if not adapters:
        raise EdgeloraError("adapters is empty; give at least one adapter directory to add")
    manifest = read_manifest(bundle)
    if manifest.mode != "switchable":
        raise EdgeloraError(
            f"{bundle}: a merged bundle has its adapter baked into model.onnx; adapters can be added only to "
            "a switchable bundle (exported with mode='switchable')"
        )
    import onnx

    from .switchable import slot_specs
    from .switchable_pack import packs_of

    proto = onnx.load(str(bundle / MODEL_FILE), load_external_data=False)
    specs = slot_specs(proto)
    if manifest.task == CAUSAL_LM:  # a decoder graph names its weights by graph position; the manifest lists the slots
        slots = manifest.slots or {}
        layers = set(slots.get("projections") or slots.get("lora") or [])
    else:
        layers = {m[1] for init in proto.graph.initializer if (m := _LAYER_WEIGHT.match(init.name))}
        fused = (manifest.fusions or {}).get("attention_layers") or {}
        layers |= {layer for group in fused.values() for layer in group}  # q, k, v packed into one Attention weight
        layers |= {layer for pack in packs_of(manifest.slots).values() for layer in pack.layers}  # ... or one MatMul
    existing = set(manifest.adapter_names)

    say("checking adapters")
    added: dict[str, tuple[AdapterEntry, dict[str, np.ndarray]]] = {}
    for requested, path in adapters.items():
        entry, values = _convert(Path(path), requested, bundle, manifest, specs, layers, base)
        name = entry.name
        if name in added or (name in existing and not replace):
            raise EdgeloraError(
                f"{path}: bundle {bundle} already has an adapter {name!r}; write NEW_NAME={path} to add it under "
                "another name, or pass replace=True"
            )
        added[name] = (entry, values)

    report: dict[str, Any] = {}
    if check:
        say("loading base")
        report = _check_against_torch(bundle, manifest, proto, base, adapters, added)

    say("writing bundle")
    return _write(bundle, manifest, specs, added, report)


def _convert(path: Path, name: str, bundle: Path, manifest: Manifest, specs: Mapping[str, SlotSpec],
             layers: set[str], base: str | Path | None = None) -> tuple[AdapterEntry, dict[str, np.ndarray]]:
    """An adapter directory -> (its manifest entry, its tensors in the graph's slot form), checked."""
    import torch

    from edgelora.peft_format import HEAD_PREFIX, WEIGHTS_FILE, adapter_config, config_labels, read_adapter

    from . import switchable
    from .switchable_pack import pack_slots, packs_of

    data, tensors = read_adapter(path)
    source = str(path / "adapter_config.json")
    config = adapter_config(data, source)
    extras = data.get("edgelora") or {}
    if manifest.task == CAUSAL_LM and (data.get("task_type") not in (None, "CAUSAL_LM") or not isinstance(config, LoraConfig)):
        raise EdgeloraError(f"{source}: a {data.get('task_type') or config.kind} adapter cannot go into decoder bundle "
                            f"{bundle}; give a CAUSAL_LM LoRA adapter")
    if not ADAPTER_NAME.fullmatch(name):
        raise EdgeloraError(f"{path}: adapter name {name!r} must be {ADAPTER_NAME_RULE}; write NAME={path}")
    fingerprint, theirs = manifest.base.fingerprint if manifest.base else None, extras.get("base_fingerprint")
    if theirs and fingerprint and theirs != fingerprint:
        raise EdgeloraError(
            f"{path}: adapter was trained on another base (fingerprint {theirs[:12]}…) than bundle {bundle} "
            f"holds ({fingerprint[:12]}…); export it with the base it was trained on"
        )
    token_adapter = (extras.get("task") or data.get("task_type")) in (TOKEN_CLASSIFICATION, "TOKEN_CLS")
    if token_adapter != (manifest.task == TOKEN_CLASSIFICATION):
        raise EdgeloraError(f"{path}: a {'token' if token_adapter else 'sequence'}-classification adapter cannot "
                            f"join bundle {bundle} of task {manifest.task}; export it in a bundle of its own task")
    quant = manifest.quantization
    trained = extras.get("quantization") or {}
    if quant and trained and manifest.task == CAUSAL_LM:
        from edgelora.config import scheme_of

        from .decoder_int8 import recipe_of

        own, theirs = scheme_of(recipe_of(trained, source)), quant.int8_scheme or "block"
        if own != theirs:
            raise EdgeloraError(f"{path}: adapter was trained with the {own} int8 scheme, bundle {bundle} is {theirs}; "
                                f"retrain it with the {theirs} scheme or export a new bundle with it")
    if quant and trained and trained.get("weight_bits") != quant.weight_bits:
        raise EdgeloraError(
            f"{path}: adapter was trained with {trained.get('weight_bits')}-bit weights, bundle {bundle} is "
            f"{quant.weight_bits}-bit; retrain with weight_bits={quant.weight_bits} or export anew"
        )
    if quant:
        # a decoder's LoRA branch reads the unsmoothed input, so an adapter trained fp32 joins a smoothed bundle as
        # it does at export; one trained int8 must have had the bundle's factors (or none, with an unsmoothed one)
        _check_smoothing(path, bundle, quant.smoothing_digest, plain_ok=manifest.task == CAUSAL_LM and not trained)
    if quant and quant.activation_mode == "static":
        raise EdgeloraError(
            f"{bundle}: its int8 activation ranges are static, calibrated with the adapters it was exported with; "
            "export a new bundle with all the adapters instead"
        )
    slots = manifest.slots or {}
    head_prefix, head = _check_head(path, bundle, data, tensors, slots, token_adapter)
    if isinstance(config, BottleneckConfig) and config.activation != slots.get("bottleneck_activation"):
        have = slots.get("bottleneck_activation")
        raise EdgeloraError(
            f"{path}: a {config.activation} bottleneck adapter cannot use bundle {bundle}, "
            + (f"whose bottleneck slots apply {have}" if have else "which has no (recorded) bottleneck slots")
            + "; export the bundle with this adapter"
        )

    def resolve(layer_key: str) -> str:
        layer = _resolve(layer_key, layers)
        if layer is None:
            raise EdgeloraError(
                f"{path}: adapter targets layer {layer_key}, which bundle {bundle} does not have; wrong base?"
            )
        return layer

    arrays = {key: tensor.detach().to(torch.float32).numpy() for key, tensor in tensors.items()}
    scaling = config.scaling_for if isinstance(config, LoraConfig) else None  # per layer: rank_pattern ranks differ
    converted = switchable.peft_slots(arrays, scaling, resolve, path, head_prefix)
    natural = {slot: value for slot, (value, _key) in converted.items()}
    if "head.weight_t" in natural and "head.bias" not in natural and head_prefix != HEAD_PREFIX:
        natural["head.bias"] = np.zeros(natural["head.weight_t"].shape[1], np.float32)  # GPT-2's score: no bias
        converted["head.bias"] = natural["head.bias"], f"{head_prefix}weight"
    sources = {slot: key for slot, (_value, key) in converted.items()}
    packs = packs_of(slots)
    _check_packed(natural, packs, specs, sources, path, bundle)
    natural = pack_slots(natural, packs, path)  # q, k, v LoRA into the bundle's packed slots, where it packs them
    sources.update({f"model.base.{name}.lora_{ab}": f"the LoRA of {', '.join(pack.lora)}"
                    for name, pack in packs.items() for ab in "AB"})
    for slot in natural:
        if slot in specs:
            continue
        layer = slot.removeprefix("model.base.").rsplit(".", 1)[0]
        kind = "LoRA" if "lora" in slot else "bottleneck"
        have = sorted(layer for n in specs if n.endswith(".lora_A" if kind == "LoRA" else ".down_w")
                      for layer in _slot_layers(n.rsplit(".", 1)[0].removeprefix("model.base."), packs))
        where = f"{len(have)} layers, e.g. {have[0]}" if have else "none"
        hint = "re-export the bundle with lora_slots='attention+mlp'" if kind == "LoRA" else "export the bundle with this adapter"
        raise EdgeloraError(
            f"{path}: adapter targets layer {layer} with {kind}, which has no {kind} slot in bundle {bundle} "
            f"({kind} slots: {where}); {hint}"
        )
    if isinstance(config, LoraConfig) and not any(s.endswith(".lora_A") for s in natural):
        raise EdgeloraError(f"{path}: holds no LoRA weights; re-save the adapter")

    values = {}
    for slot, value in natural.items():
        spec = specs[slot]
        row = spec.row(value)
        if not spec.fits(row):
            want = [("*" if spec.banked and i == 0 else "width" if i == spec.width_axis else d)
                    for i, d in enumerate(spec.shape)]
            raise EdgeloraError(
                f"{path}: {sources[slot]} has shape {tuple(value.shape)}, which does not fit bundle {bundle}'s "
                f"input {slot} {want}; the adapter is for another base"
            )
        values[slot] = row
    labels = list(extras.get("labels") or [])
    width = natural["head.weight_t"].shape[1] if "head.weight_t" in natural else 0
    if not labels and head_prefix != HEAD_PREFIX:  # a PEFT task model's head: its labels are the base config's
        labels = config_labels(_base_id2label(base, manifest, data), width)
    if not labels:
        labels = [str(i) for i in range(width)]
    if len(labels) != width or ("head.bias" in natural) != ("head.weight_t" in natural):
        raise EdgeloraError(f"{path}: {len(labels)} labels but a head of {width} outputs; re-save the adapter")
    mode = trained.get("mode")
    entry = AdapterEntry.create(
        name, kind=config.kind, labels=labels, head=head, switchable=True,
        source_sha256=sha256_file(path / WEIGHTS_FILE),  # the adapter weights added
        trained_with={"weight_bits": trained["weight_bits"], "modes": [mode or "merged"]} if trained else None,
        warning=f"fake-quantized for {mode} deployment, added to a switchable bundle"
        if trained and mode not in (None, "switchable") else None,
    )
    return entry, values


def _slot_layers(name: str, packs: Mapping) -> tuple[str, ...]:
    """The layers a slot serves: a packed q, k, v slot (`switchable_pack.Pack`) serves each LoRA layer of its pack."""
    return tuple(packs[name].lora) if name in packs else (name,)


def _check_packed(natural: Mapping[str, np.ndarray], packs: Mapping, specs: Mapping[str, SlotSpec],
                  sources: Mapping[str, str], path: Path, bundle: Path) -> None:
    """Each q, k or v LoRA tensor of a layer the bundle packs fits its part of the packed slot: A the slot's
    input width, B the layer's output width (the ranks are checked as they are packed)."""
    for pack in packs.values():
        spec = specs.get(f"model.base.{pack.name}.lora_A")
        if spec is None:
            continue
        for layer, width in zip(pack.layers, pack.widths):
            for ab, axis, want, form in (("A", -2, spec.shape[-2], f"({spec.shape[-2]}, r)"), ("B", -1, width, f"(r, {width})")):
                slot = f"model.base.{layer}.lora_{ab}"
                value = natural.get(slot)
                if value is not None and value.shape[axis] != want:
                    raise EdgeloraError(
                        f"{path}: {sources[slot]} has shape {tuple(value.shape)}, which does not fit bundle {bundle}'s "
                        f"input model.base.{pack.name}.lora_{ab} (its part {form}); the adapter is for another base"
                    )


def _base_id2label(base: str | Path | None, manifest: Manifest, data: dict) -> dict | None:
    """The id2label of the base's config.json, from the first local directory among `base`, the manifest's
    base and the adapter's base_model_name_or_path (None where none is at hand: labels are then LABEL_i)."""
    import json

    for where in (base, manifest.base.name if manifest.base else None, data.get("base_model_name_or_path")):
        config = Path(where) / "config.json" if where else None
        if config is not None and config.is_file():
            try:
                return json.loads(config.read_text()).get("id2label")
            except (OSError, ValueError, AttributeError):
                raise EdgeloraError(f"{config}: not a readable JSON config; pass base=DIR of the bundle's base "
                                    "model, whose config.json names the labels") from None
    return None


def _check_head(path: Path, bundle: Path, data: dict, tensors: Mapping, slots: Mapping,
                token_adapter: bool) -> tuple[str, str | None]:
    """Refuse an adapter whose head the bundle's graph does not compute: the graph pools one way for all
    (`edgelora.heads`). A head of one linear layer (ours mean-pooled, per-token, last-token) joins a bundle of
    its kind; one with a dense layer (BERT's pooler, RoBERTa's, DistilBERT's) goes in a bundle of its own.
    Returns the key prefix of the head's weight and bias in the adapter file, and the head's kind (None: none)."""
    from edgelora.heads import ARCH_HEADS, HEAD_KINDS
    from edgelora.peft_format import HEAD_PREFIX, PEFT_PREFIX

    extras = data.get("edgelora") or {}
    task_type = data.get("task_type")
    if f"{HEAD_PREFIX}weight" in tensors:
        theirs = PER_TOKEN if token_adapter else MEAN_POOLED
    else:
        theirs = extras.get("head") or (PER_TOKEN if task_type == "TOKEN_CLS" else
                                         "an architecture's (PEFT SEQ_CLS)" if task_type == "SEQ_CLS" else None)
    ours = slots.get("head", MEAN_POOLED)  # bundles before the field had a mean-pooled head slot
    if theirs == "an architecture's (PEFT SEQ_CLS)" and ours in ARCH_HEADS.values():
        theirs = ours  # the bundle's base applies this architecture head, so a stock SEQ_CLS adapter of it has it
    if theirs is None:
        return HEAD_PREFIX, None
    kind = HEAD_KINDS.get(theirs)
    if kind is None or kind.dense_key is not None:
        raise EdgeloraError(f"{path}: add-adapter takes adapters whose head is one linear layer ("
                            f"{', '.join(n for n, k in HEAD_KINDS.items() if k.dense_key is None)}) or none, this one has "
                            f"{theirs} head; export a new bundle with it (mode='switchable')")
    if ours != theirs:
        raise EdgeloraError(f"{path}: its {theirs} head cannot run in bundle {bundle}, whose graph applies "
                            f"{ours or 'no head'}; export a new bundle with this adapter")
    if f"{HEAD_PREFIX}weight" in tensors:
        return HEAD_PREFIX, theirs
    # a per-token head is `classifier`, or `score` in Llama-style task models (edgelora.heads.out_key)
    keys = [kind.out_key] + (["score"] if theirs == PER_TOKEN else [])
    return next((f"{PEFT_PREFIX}{k}." for k in keys if f"{PEFT_PREFIX}{k}.weight" in tensors),
                f"{PEFT_PREFIX}{kind.out_key}."), theirs


def _check_smoothing(path: Path, bundle: Path, theirs: str | None, plain_ok: bool = False) -> None:
    """An int8 bundle's SmoothQuant factors (`theirs`: their digest) are baked into its base graph: a new adapter
    must have trained with them (`plain_ok`: or with none)."""
    from edgelora import smooth

    mine = smooth.factors_digest(smooth.load_factors(path))
    if mine == theirs or (plain_ok and mine is None):
        return
    if mine and theirs:
        why = f"trained with other SmoothQuant factors than bundle {bundle} holds"
    elif mine:
        why = f"trained with SmoothQuant (QuantConfig.smoothing) but bundle {bundle} is not smoothed"
    else:
        why = f"trained without SmoothQuant but bundle {bundle} smooths its int8 inputs"
    raise EdgeloraError(f"{path}: {why}; export a new bundle with all the adapters")


def _resolve(name: str, layers: set[str]) -> str | None:
    """PEFT keys may carry the task model's backbone attribute (`bert.encoder...`): drop leading parts."""
    parts = name.split(".")
    for i in range(min(3, len(parts))):
        if ".".join(parts[i:]) in layers:
            return ".".join(parts[i:])
    return None


def _base_for_check(bundle: Path, manifest: Manifest, base: str | Path | None):
    """The base model to check new adapters against: `base`, else the one the manifest names; it must have the
    bundle's fingerprint."""
    from edgelora.model import fingerprint, load_base, load_causal_lm

    recorded = manifest.base
    base = base if base is not None else (recorded.name if recorded else None)
    if not base:
        raise EdgeloraError(f"{bundle}: manifest.json names no base to check the new adapter against; pass base, "
                            "or check=False")
    try:
        hf_model, _ = (load_causal_lm if manifest.task == CAUSAL_LM else load_base)(base)
    except EdgeloraError as e:
        raise EdgeloraError(f"{e} (needed to check the new adapter against torch: pass base, or check=False)") from None
    mine = fingerprint(hf_model)
    if recorded is None or mine != recorded.fingerprint:
        raise EdgeloraError(f"{base}: is not the base of bundle {bundle} (fingerprint {mine[:12]}…, bundle "
                            f"{str(recorded.fingerprint if recorded else None)[:12]}…); pass the right base")
    return hf_model


def _check_against_torch(bundle: Path, manifest: Manifest, proto: onnx.ModelProto, base: str | Path | None,
                         paths: Mapping[str, str | Path], added: dict) -> dict:
    """Run each new adapter through the graph and compare with torch, as export's own check does."""
    hf_model = _base_for_check(bundle, manifest, base)
    if manifest.task == CAUSAL_LM:
        from .decoder_switchable import check_added

        return check_added(manifest, proto, hf_model, paths, {name: values for name, (_e, values) in added.items()})
    from edgelora.model import AdapterModel
    from edgelora.peft_format import load_adapter

    from . import validate
    from .switchable import write_adapter_file

    if manifest.task == TOKEN_CLASSIFICATION:
        from edgelora.token_model import TokenAdapterModel

        model = TokenAdapterModel(hf_model)
    else:
        model = AdapterModel(hf_model)
    for name in added:
        load_adapter(model, paths[name], name)
    precision = manifest.precision
    recipe = None
    if precision == "int8":
        q = manifest.quantization
        recipe_dict = dict(q.recipe or {"weight_bits": q.weight_bits, "activations": "dynamic"})
        recipe_dict["mode"] = "switchable"
        recipe = QuantConfig(**recipe_dict)  # its __post_init__ makes JSON's lists tuples
    model.set_quant(recipe)
    vocab = model.base.get_input_embeddings().num_embeddings
    feeds = validate.generated_feeds(vocab, manifest.inputs)
    sess = validate.session(proto.SerializeToString())
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (entry, values) in added.items():
            file = Path(tmp) / f"{name}.onnx_adapter"
            write_adapter_file(file, values)
            options, _adapter = validate.adapter_run_options(str(file))
            logits, pooled = validate.run_graph(sess, feeds, options)
            model.set_adapter(name)
            ref_logits, ref_pooled = validate.torch_outputs(model, feeds)
            if not entry.labels:  # no task head in the adapter: only the embeddings are its output
                ref_logits = ref_logits[..., :0]
            lc, pc = validate.compare("logits", logits, ref_logits), validate.compare("embeddings", pooled, ref_pooled)
            validate.check_tolerance(precision, f"adapter {name!r}", lc, pc, float(np.abs(ref_pooled).max()))
            key = "vs_fake_quant_torch" if precision == "int8" else "vs_fp32_torch"
            report[name] = {key: {"logits": lc.as_dict(), "embeddings": pc.as_dict()}}
    return report


def _write(bundle: Path, manifest: Manifest, specs: Mapping[str, SlotSpec], added: dict, report: dict) -> Manifest:
    """The bundle with the new adapters and a rebuilt bank, through the one bundle writer
    (`edgelora.runtime.bundle.write_bundle`): unchanged files carried over, the new ones written, the manifest last."""
    from . import switchable

    banked = any(s.banked for s in specs.values())
    entries = tuple(a for a in manifest.adapters if a.name not in added) + tuple(e for e, _ in added.values())
    writers: dict[str, Callable[[Path], None]] = {
        entry.file: (lambda p, values=values: switchable.write_adapter_file(p, values))
        for entry, values in added.values()
    }
    bank = manifest.bank
    if banked:
        values = {a.name: added[a.name][1] if a.name in added
                  else switchable.read_adapter_file(bundle / a.file) for a in entries}
        stacked = switchable.build_bank(values, specs)
        writers[BANK_FILE] = lambda p: switchable.write_adapter_file(p, stacked)
        bank = Bank(file=BANK_FILE, adapters=(*values, None))
    out = dataclasses.replace(manifest, adapters=entries, bank=bank, validation=dict(manifest.validation, **report),
                              files={})  # write_bundle records the files anew
    keep: dict[str, str | None] = {rel: sha for rel, sha in manifest.files.items() if rel not in writers}
    cache = bundle / ".cache"  # the runtime's optimized graph of the unchanged model.onnx stays valid
    if cache.is_dir():
        keep.update({p.relative_to(bundle).as_posix(): None for p in cache.rglob("*")
                     if p.is_file() and not p.name.endswith(".tmp")})
    write_bundle(bundle, out, writers, None, keep=keep)
    return read_manifest(bundle)
