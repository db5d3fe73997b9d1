"""Load an edgelora bundle into one ONNX Runtime CPU session and run text or feeds through it.

The bundle is checked before anything is loaded (`edgelora.runtime.bundle.read_manifest`: format, version,
fields and every file's sha256); runtime/session.py loads the session, tokenizer and adapter files, and this
module holds them and runs them. In switchable mode each adapter is loaded once and bound to its own
RunOptions, so choosing an adapter per call costs microseconds and never a new session.
A batch that mixes adapters (`adapters=[...]`, one per row) runs once, through the bundle's adapter bank
(`bank.onnx_adapter`, loaded on first use) and the graph's `adapter_ids` input: see exporters/switchable.py.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import (ADAPTER_IDS, CAUSAL_LM, MANIFEST_FILE, MODEL_FILE, TOKEN_CLASSIFICATION, Manifest,
                                     read_manifest)
from edgelora.runtime.cpu import detect_isa, int8_saturates
from edgelora.runtime.session import check_requires, first_line, load_adapter, load_session, load_tokenizer


class Runtime:
    """A bundle loaded into one ONNX Runtime CPU session, with its adapters ready to switch.

    Example:
        >>> rt = Runtime("bundles/minilm-int8")               # doctest: +SKIP
        >>> rt.predict(["great film"], adapter="sentiment")  # doctest: +SKIP
        [{'label': 'pos', 'score': 0.97, 'scores': {'neg': 0.03, 'pos': 0.97}}]

    Args:
        bundle_dir: the directory `edgelora export` wrote.
        intra_op_threads: ORT intra-op threads; None means the physical cores (SMT siblings only add
            contention for GEMM-bound work).
        allow_spinning: let idle pool threads spin between runs. Faster for one session alone; turn it off
            when several sessions or processes share the cores, or they steal each other's cores.
        optimized_cache: save the ORT-optimized graph under `<bundle>/.cache/` and load it next time,
            skipping graph optimization. Keyed by model sha256, ORT version and ISA; skipped silently where
            the bundle directory is read-only. None (the default): on for encoder bundles, off for decoder
            bundles, whose graph is hundreds of MB and optimizes in seconds.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        *,
        intra_op_threads: int | None = None,
        allow_spinning: bool = True,
        optimized_cache: bool | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        if optimized_cache is None:
            optimized_cache = self.manifest.task != CAUSAL_LM
        check_requires(self.manifest, self.bundle_dir)
        cpu = detect_isa()
        threads = cpu.physical_cores if intra_op_threads is None else intra_op_threads
        if not isinstance(threads, int) or threads < 1:
            raise EdgeloraError(f"intra_op_threads is {intra_op_threads!r}; pass a positive integer or None")
        self.intra_op_threads = threads
        self._warn_if_saturating(cpu.isa)
        self._session = load_session(self.bundle_dir, self.manifest, cpu.isa, threads=threads, spinning=allow_spinning,
                                     use_cache=optimized_cache)
        self._check_io()
        self._tokenizer = load_tokenizer(self.bundle_dir, self.manifest.tokenizer)
        # Adapters reach the graph only through RunOptions, and ORT ignores them on the IOBinding path
        # (run_with_iobinding silently runs the plain base): a run with one active goes through session.run,
        # never the shared cache's bound runs (Generator.shares_cache).
        self._run_options: dict[str | None, ort.RunOptions] = {None: ort.RunOptions()}
        self._lora: list[ort.LoraAdapter] = []  # keeps the loaded adapters alive for their RunOptions
        if self.manifest.mode == "switchable":
            for entry in self.manifest.adapters:
                self._run_options[entry.name] = self._load_adapter(self.bundle_dir / entry.file)
        elif self.manifest.adapters:
            self._run_options[self.manifest.adapters[0].name] = self._run_options[None]
        # The adapter bank: (RunOptions, name -> entry), loaded on the first mixed batch, since only mixed
        # batches need it and it holds every adapter a second time.
        self._bank: tuple[ort.RunOptions, dict[str | None, int]] | None = None
        self._bank_lock = threading.Lock()
        self._banked: bool | None = None
        self._generator = None  # a decoder bundle's Generator, built on first use over this session

    # -- loading (the parts themselves load in runtime/session.py) ---------------------------------

    def _warn_if_saturating(self, isa: str) -> None:
        quant = self.manifest.quantization
        # The 7-bit advice is for MLAS's u8 x s8 kernels (DynamicQuantizeMatMul, and MatMulIntegerToFloat in a
        # rowwise decoder bundle); block decoder bundles run MatMulNBits, whose behaviour on CPUs without VNNI has
        # not been measured, so nothing is claimed for them here.
        if self.manifest.task == CAUSAL_LM and (quant is None or quant.int8_scheme != "rowwise"):
            return
        if quant is not None and quant.extra.get("weight_type") == "uint8":  # u8 x u8: no 16-bit pair sums to saturate
            return
        if self.manifest.precision == "int8" and quant is not None and quant.weight_bits == 8 and int8_saturates(isa):
            warnings.warn(
                f"{self.bundle_dir}: 8-bit int8 weights (tuned for {quant.isa or 'another CPU'}) on this {isa} "
                "CPU, whose int8 kernel saturates 16-bit pair sums: expect accuracy loss; export with 7-bit "
                "weights for this CPU",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check_io(self) -> None:
        model = self.bundle_dir / MODEL_FILE
        self._session_inputs = {i.name: i for i in self._session.get_inputs()}
        unfed = sorted(set(self._session_inputs) - set(self.manifest.inputs))
        if unfed:
            raise EdgeloraError(
                f"{model}: graph inputs {unfed} are not in manifest.json 'inputs'; re-export the bundle"
            )
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [o for o in self.manifest.outputs if o not in outputs]
        if missing:
            raise EdgeloraError(f"{model}: has no output {missing} that manifest.json lists; re-export the bundle")
        self._outputs = list(self.manifest.outputs)

    def _load_adapter(self, path: Path, bank_entries: int | None = None) -> ort.RunOptions:
        """RunOptions activating the checked `.onnx_adapter` at `path`; the adapter is kept alive with them."""
        options, adapter = load_adapter(self._session, path, bank_entries)
        self._lora.append(adapter)
        return options


    @property
    def adapters(self) -> tuple[str, ...]:
        """Adapter names, in manifest order (the baked one in merged mode)."""
        return self.manifest.adapter_names

    @property
    def vocab_size(self) -> int | None:
        """Size of the tokenizer's vocabulary (with added tokens), or None for a bundle without one."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True) if self._tokenizer else None

    @property
    def session(self) -> ort.InferenceSession:
        """The ORT session. Never use it with run_with_iobinding and adapters: ORT ignores them there."""
        return self._session

    def _options_for(self, adapter: str | None) -> ort.RunOptions:
        if adapter in self._run_options:
            return self._run_options[adapter]
        available = ", ".join(self.adapters) or "none"
        if self.manifest.mode == "merged":
            raise EdgeloraError(
                f"{self.bundle_dir}: merged bundle has adapter {available} baked in, not {adapter!r}; "
                "pass adapter=None or that name"
            )
        raise EdgeloraError(f"{self.bundle_dir}: no adapter {adapter!r}; available: {available}")

    def labels(self, adapter: str | None = None) -> tuple[str, ...]:
        """Label names of an adapter's logits columns (in merged mode, of the baked adapter)."""
        self._options_for(adapter)
        if adapter is None:
            if self.manifest.mode == "switchable" or not self.adapters:
                return ()
            adapter = self.adapters[0]
        return self.manifest.entry(adapter).labels

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Texts -> int64 feeds [batch, seq], truncated to max_length (with a RuntimeWarning) and padded to the longest."""
        if self._tokenizer is None:
            raise EdgeloraError(f"{self.bundle_dir / MANIFEST_FILE}: bundle has no tokenizer; pass feeds instead")
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise EdgeloraError("tokenize: pass a non-empty list of strings")
        enc = self._tokenizer.encode_batch(list(texts))
        cut = sum(1 for e in enc if e.overflowing)
        if cut:  # truncation is what the bundle promises (the base has no more positions); say it happened
            warnings.warn(
                f"{cut} text{'s' if cut > 1 else ''} longer than the bundle's max_length of "
                f"{self.manifest.tokenizer.max_length} tokens truncated to it",
                RuntimeWarning,
                stacklevel=2,
            )
        columns = {
            "input_ids": [e.ids for e in enc],
            "attention_mask": [e.attention_mask for e in enc],
            "token_type_ids": [e.type_ids for e in enc],
        }
        feeds = {}
        for name in self.manifest.inputs:
            if name not in columns:
                raise EdgeloraError(
                    f"{self.bundle_dir / MANIFEST_FILE}: input {name!r} cannot be made from text; pass feeds"
                )
            feeds[name] = np.asarray(columns[name], dtype=np.int64)
        return feeds

    def _check_feeds(self, feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
        known = set(self.manifest.inputs)
        unknown = sorted(set(feeds) - known)
        if unknown:
            raise EdgeloraError(f"feeds {unknown} are not inputs of {self.bundle_dir}; expected {sorted(known)}")
        out = {k: np.asarray(v) for k, v in feeds.items() if k in self._session_inputs}
        if "input_ids" in out:  # friendly defaults for the two inputs whose value is obvious
            if "attention_mask" in self._session_inputs and "attention_mask" not in out:
                out["attention_mask"] = np.ones_like(out["input_ids"], dtype=np.int64)
            if "token_type_ids" in self._session_inputs and "token_type_ids" not in out:
                out["token_type_ids"] = np.zeros_like(out["input_ids"], dtype=np.int64)
        missing = sorted(set(self._session_inputs) - set(out))
        if missing:
            raise EdgeloraError(f"feeds lack inputs {missing} of {self.bundle_dir}; pass them or pass texts")
        for k, v in out.items():
            if v.dtype.kind in "iub" and v.dtype != np.int64 and "int64" in self._session_inputs[k].type:
                out[k] = v.astype(np.int64)
        return out

    @property
    def mixes_in_one_run(self) -> bool:
        """Whether a batch mixing adapters (`adapters=[...]`) runs as one session run: the bundle has an
        adapter bank. Older switchable bundles run such a batch once per adapter instead."""
        if self._banked is None:
            self._banked = self.manifest.bank is not None and any(
                i.name == ADAPTER_IDS for i in self._session.get_overridable_initializers())
        return self._banked

    def _bank_options(self) -> tuple[ort.RunOptions, dict[str | None, int]]:
        """The bank's RunOptions and each adapter's entry in it; loaded on first use, once."""
        with self._bank_lock:
            if self._bank is None:
                spec = self.manifest.bank
                order = spec.adapters
                missing = [a for a in self.adapters if a not in order]
                if missing or None not in order or len(set(order)) != len(order):
                    raise EdgeloraError(
                        f"{self.bundle_dir / MANIFEST_FILE}: the adapter bank {spec.file} lacks adapters "
                        f"{missing or ['(no adapter)']} or repeats one; re-export the bundle or re-run "
                        "`edgelora add-adapter`"
                    )
                options = self._load_adapter(self.bundle_dir / spec.file, bank_entries=len(order))
                self._bank = (options, {name: i for i, name in enumerate(order)})
            return self._bank

    def row_options(self, adapters: Sequence[str | None]) -> tuple[ort.RunOptions, dict[str, np.ndarray]]:
        """The RunOptions and extra feeds for one session run whose row i goes through `adapters[i]`
        (None: the plain base). One adapter for every row: that adapter's per-call options and no extra
        feed. Different adapters: the bank's options and `adapter_ids` [rows]; a bundle without a bank
        cannot mix them in one run (`mixes_in_one_run`)."""
        rows = list(adapters)
        if not rows:
            raise EdgeloraError("adapters is empty; pass one adapter name (or None) per row")
        options = {name: self._options_for(name) for name in dict.fromkeys(rows)}
        if len({id(o) for o in options.values()}) == 1:
            return options[rows[0]], {}
        if not self.mixes_in_one_run:
            raise EdgeloraError(f"{self.bundle_dir / MANIFEST_FILE}: this bundle has no adapter bank, so a batch "
                                "cannot mix adapters in one run; re-export it in switchable mode")
        bank, index = self._bank_options()
        return bank, {ADAPTER_IDS: np.array([index[r] for r in rows], np.int64)}

    def _session_run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self._outputs, feeds, options)
        except Exception as e:  # noqa: BLE001
            raise EdgeloraError(
                f"{self.bundle_dir / MODEL_FILE}: run failed ({first_line(e)}); check the feeds' shapes and dtypes"
            ) from None
        return dict(zip(self._outputs, values))

    def run(
        self,
        x: str | Sequence[str] | Mapping[str, object],
        adapter: str | None = None,
        *,
        adapters: Sequence[str | None] | None = None,
    ) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Run texts (tokenized here) or a dict of numpy feeds; returns the manifest's outputs by name.

        Args:
            adapter: in switchable mode the adapter to apply, None for the plain base (then `logits`
                is [batch, 0]); in merged mode None or the baked adapter's name.
            adapters: instead, one adapter (or None) per row: the batch runs once, each row through its
                own adapter (the bundle's adapter bank). `logits` is then a list with one 1-D array per
                row, each of that row's adapter's label count; the other outputs stay [batch, ...] arrays.
                In fp32 each row gets what it gets alone. In int8 the base quantizes its activations per
                tensor over the whole batch (ONNX Runtime's dynamic quantization), so a row's result
                depends on its batch-mates within int8 rounding, as in any int8 batch.

        Example:
            >>> rt.run(["great film", "match report"], adapters=["sentiment", "topic"])["logits"]  # doctest: +SKIP
            [array([-1.2,  2.3], dtype=float32), array([ 0.1, -0.4,  1.9], dtype=float32)]
        """
        if adapters is None:
            options = self._options_for(adapter)
            return self._session_run(self._check_feeds(x) if isinstance(x, Mapping) else self.tokenize(x), options)
        if adapter is not None:
            raise EdgeloraError("run: pass adapter= (one for the batch) or adapters= (one per row), not both")
        rows = list(adapters)
        if not rows:
            raise EdgeloraError("run: adapters= is empty; pass one adapter name (or None) per row")
        options = {name: self._options_for(name) for name in dict.fromkeys(rows)}
        feeds = self._check_feeds(x) if isinstance(x, Mapping) else self.tokenize(x)
        batch = len(next(iter(feeds.values())))
        if len(rows) != batch:
            raise EdgeloraError(f"run: {len(rows)} adapters for a batch of {batch} rows; pass one per row")
        widths = [len(self.labels(name)) for name in rows]
        if len({id(o) for o in options.values()}) == 1 or self.mixes_in_one_run:
            row_options, extra = self.row_options(rows)
            out = self._session_run({**feeds, **extra}, row_options)
        else:  # a bundle without a bank: one run per adapter, rows put back in order
            out = {}
            for name, opts in options.items():
                picked = [i for i, r in enumerate(rows) if r == name]
                part = self._session_run({k: v[picked] for k, v in feeds.items()}, opts)
                for key, value in part.items():
                    if key not in out:
                        out[key] = np.zeros((batch, *value.shape[1:]), value.dtype) if key != "logits" else [None] * batch
                    for j, i in enumerate(picked):
                        out[key][i] = value[j]
            if "logits" in out:
                out["logits"] = [np.asarray(v) for v in out["logits"]]
            return out
        if "logits" not in out:  # an embeddings bundle: no head, nothing to trim
            return out
        logits = out["logits"]
        if logits.shape[-1] < max(widths):
            raise EdgeloraError(
                f"{self.bundle_dir / MANIFEST_FILE}: adapters list up to {max(widths)} labels but model.onnx "
                f"gives {logits.shape[-1]} logits; re-export the bundle"
            )
        out["logits"] = [logits[i, ..., :w] for i, w in enumerate(widths)]  # drop each row's zero-padded columns
        return out

    def predict(
        self,
        texts: str | Sequence[str],
        adapter: str | None = None,
        *,
        adapters: Sequence[str | None] | None = None,
        batch_size: int = 32,
    ) -> list[dict]:
        """Classify texts: per text {"label", "score", "scores": {label: probability}} (softmax of logits).

        A token-classification bundle tags words instead: per text {"words": [{"text", "start", "end", "label",
        "score"}], "entities": [{"label", "start", "end", "text", "score"}]}, each word tagged from its first
        sub-token and BIO tags merged into entities with character offsets (`runtime/token_predict.py`).

        Args:
            adapter: the adapter for every text.
            adapters: instead, one adapter per text; each batch of `batch_size` texts runs once, every
                text through its own adapter (see `run`). Results come back in input order.
            batch_size: texts per session run; bounds padding waste and memory on long inputs.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        per_row = list(adapters) if adapters is not None else [adapter] * len(texts)
        if len(per_row) != len(texts):
            raise EdgeloraError(f"predict: {len(per_row)} adapters for {len(texts)} texts; pass one per text")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EdgeloraError(f"predict: batch_size {batch_size!r} must be a positive integer")
        labels = {name: self.labels(name) for name in dict.fromkeys(per_row)}
        for name, names in labels.items():
            if not names:
                available = ", ".join(self.adapters) or "none"
                what = f"adapter {name!r} has no labels (no task head)" if name else "no labels without an adapter"
                raise EdgeloraError(f"{self.bundle_dir}: {what}; pass adapter= one of {available}")
        if self.manifest.task == TOKEN_CLASSIFICATION:
            from edgelora.runtime.token_predict import predict_entities

            return predict_entities(self, texts, per_row, labels, batch_size)
        results: list[dict] = []
        for start in range(0, len(texts), batch_size):
            chunk = per_row[start : start + batch_size]
            if len(set(chunk)) == 1:
                logits = self.run(texts[start : start + batch_size], chunk[0])["logits"]
            else:
                logits = self.run(texts[start : start + batch_size], adapters=chunk)["logits"]
            for name, row in zip(chunk, logits):
                if row.shape[-1] != len(labels[name]):
                    raise EdgeloraError(
                        f"{self.bundle_dir / MANIFEST_FILE}: adapter {name!r} lists {len(labels[name])} labels but "
                        f"model.onnx gives {row.shape[-1]} logits; re-export the bundle"
                    )
                z = np.exp(row.astype(np.float64) - row.max())
                p = z / z.sum()  # (num_labels,)
                best = int(p.argmax())
                results.append({"label": labels[name][best], "score": float(p[best]),
                                "scores": {lab: float(q) for lab, q in zip(labels[name], p)}})
        return results

    def generator(self):
        """The `Generator` of a decoder bundle (task "causal-lm"), sharing this session and its adapters."""
        if self.manifest.task != CAUSAL_LM:
            raise EdgeloraError(f"{self.bundle_dir}: an encoder bundle does not generate text; use run() or "
                                "predict(), or export a causal LM")
        if self._generator is None:
            from edgelora.runtime.generate import Generator

            self._generator = Generator(self.bundle_dir, session=self._session, manifest=self.manifest,
                                        run_options=self._run_options, row_options=self.row_options)
        return self._generator

    def generate(self, prompt, adapter: str | None = None, **kwargs) -> str:
        """A decoder bundle's reply to a text or chat messages; see `Generator.stream` for the arguments."""
        return self.generator().generate(prompt, adapter, **kwargs)

    def stream(self, prompt, adapter: str | None = None, **kwargs):
        """A decoder bundle's reply piece by piece as it decodes; see `Generator.stream`."""
        return self.generator().stream(prompt, adapter, **kwargs)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Runtime({str(self.bundle_dir)!r}, mode={m.mode}, precision={m.precision}, "
                f"adapters={list(self.adapters)}, threads={self.intra_op_threads})")
