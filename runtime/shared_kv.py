"""One KV buffer per cache tensor, written in place: decode steps of GroupQueryAttention bundles without copying
the cache.

A decoder graph returns `present.{i}.*` = past + the new tokens, which the caller feeds back as the next
`past_key_values.{i}.*`: every step copies the whole cache (and ONNX Runtime zero-fills the new present first),
which grows with the context. ONNX Runtime's GroupQueryAttention (the export's `attention="gqa"` core) can
instead read and write one buffer: when a step's past and present are the same tensor, it appends the new
keys and values at the current length and leaves the rest as it is. The buffer's length is the capacity
(prompt + new tokens), allocated up front as llama.cpp's context and ORT GenAI's max_length are: batch x
layers x 2 x kv_heads x capacity x head_dim x 4 bytes (SmolLM2, one row, 1,024 positions: 45 MiB); the graph
still sees the current length through `attention_mask`.

The prompt's run is an ordinary `session.run` (its logits_to_keep cannot be bound by IOBinding, and the
prompt's cache is written once anyway); `load` copies its presents into the buffers, then every `step` binds
the same buffers as past and present. Logits equal the copying path's (`tests/test_shared_kv.py`).

Runs IOBinding cannot make keep the copying path (`Generator.shares_cache`): ONNX Runtime 1.32 applies a
RunOptions' active LoRA adapters (a switchable bundle's adapter for all rows) only to runs given feeds, and
IOBinding binds graph inputs only, not overridable initializers (a mixed batch's `adapter_ids`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeloraError

SHARED_CORES = ("gqa",)  # attention cores whose cache may be one buffer (exporters/decoder_graph.py)


def shares_kv(graph: Mapping | None) -> bool:
    """Whether a bundle's manifest `graph` record names an attention core that can share past and present."""
    return isinstance(graph, Mapping) and graph.get("attention") in SHARED_CORES


def bindable(session: ort.InferenceSession, names: Iterable[str]) -> bool:
    """Whether every name is a graph input: IOBinding cannot bind an overridable initializer (a switchable
    bundle's `adapter_ids` default, `logits_to_keep`), so runs that override one keep the copying path."""
    inputs = {i.name for i in session.get_inputs()}
    return all(name in inputs for name in names)


class SharedKV:
    """Fixed-capacity KV buffers, (batch, kv_heads, capacity, head_dim) float32 each, bound as both past and
    present of every decode step.

    Example:
        >>> kv = SharedKV.holding(session, past, present, presents_of_the_prompt_run, decode_runs=32)  # doctest: +SKIP
        >>> logits = kv.step({"input_ids": ..., "attention_mask": ..., "position_ids": ...})      # doctest: +SKIP
    """

    def __init__(self, session: ort.InferenceSession, past: Sequence[str], present: Sequence[str], *, batch: int,
                 kv_heads: int, head_dim: int, capacity: int) -> None:
        if len(past) != len(present):
            raise EdgeloraError(f"SharedKV: {len(past)} past names for {len(present)} present names")
        self.session, self.past, self.present = session, list(past), list(present)
        self.capacity = capacity
        self.length = 0  # positions of the buffers holding cache entries
        # the OrtValues wrap these arrays' memory (no copy on CPU): `load` writes the arrays, ORT the OrtValues
        self._arrays = [np.zeros((batch, kv_heads, capacity, head_dim), np.float32) for _ in self.past]
        self._buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]
        # one binding for every step: the buffers are bound once (120 binds for SmolLM2, ~0.14 ms a step when
        # redone), each step rebinds only its feeds; a step with other feed names binds afresh
        self._binding: ort.IOBinding | None = None
        self._fed: frozenset[str] = frozenset()
        self._held: dict[str, np.ndarray] = {}

    @classmethod
    def holding(cls, session: ort.InferenceSession, past: Sequence[str], present: Sequence[str],
                presents: Sequence[np.ndarray], decode_runs: int) -> SharedKV:
        """Buffers shaped after the prompt run's `presents`, loaded with them, with room for `decode_runs`
        one-token runs after it (a prompt of T positions and n runs end at T + n)."""
        if not presents:
            raise EdgeloraError("SharedKV: the prompt run returned no cache tensor")
        batch, kv_heads, length, head_dim = (int(d) for d in presents[0].shape)
        kv = cls(session, past, present, batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                 capacity=length + max(0, decode_runs))
        kv.load(presents)
        return kv

    def load(self, presents: Sequence[np.ndarray]) -> None:
        """The prompt run's presents (batch, kv_heads, T, head_dim) into the buffers' first T positions."""
        if len(presents) != len(self._arrays):
            raise EdgeloraError(f"SharedKV: {len(presents)} cache tensors for {len(self._arrays)} buffers; pass the "
                                "prompt run's present outputs, every one, in the order of the past names")
        T = int(presents[0].shape[2])
        if T > self.capacity:
            raise EdgeloraError(f"SharedKV: the prompt's cache holds {T} positions, the buffers {self.capacity}; "
                                "make them with SharedKV.holding(..., decode_runs=N)")
        B, H, _, D = self._arrays[0].shape
        for name, value in zip(self.past, presents):
            if tuple(value.shape) != (B, H, T, D):
                raise EdgeloraError(f"SharedKV: {name} is {tuple(value.shape)}, the buffers take ({B}, {H}, {T}, {D}); "
                                    "pass the presents of the run the buffers were made for")
        for value, array in zip(presents, self._arrays):
            array[:, :, :T] = value
        self.length = T

    def cache(self) -> list[np.ndarray]:
        """The cache so far, (batch, kv_heads, length, head_dim) per tensor, in the order of the past names:
        views of the buffers, valid until the next `step` or `load`."""
        return [a[:, :, :self.length] for a in self._arrays]

    def step(self, feeds: Mapping[str, np.ndarray], options: ort.RunOptions | None = None) -> np.ndarray:
        """One run with `feeds` (everything but the cache) and the buffers as past and present; returns the
        logits. The new tokens' keys and values land at positions [length, length + new) of every buffer."""
        new = int(np.shape(feeds["input_ids"])[1])
        if self.length + new > self.capacity:
            raise EdgeloraError(f"SharedKV: {self.length} + {new} positions exceed the buffers' {self.capacity}; "
                                "make them with room for every run (SharedKV.holding's decode_runs)")
        seen = int(np.shape(feeds["attention_mask"])[1])
        if seen != self.length + new:  # the graph takes the key length from the mask: a wrong one reads stale keys
            raise EdgeloraError(f"SharedKV: attention_mask covers {seen} positions, the buffers hold {self.length} "
                                f"+ {new} new; pass the mask of every position so far")
        binding = self._binding
        if binding is None or frozenset(feeds) != self._fed:
            binding = self._binding = self.session.io_binding()
            binding.bind_output("logits", "cpu")  # first: get_outputs()[0]
            for p, q, buffer in zip(self.past, self.present, self._buffers):
                binding.bind_ortvalue_input(p, buffer)
                binding.bind_ortvalue_output(q, buffer)
            self._fed = frozenset(feeds)
        self._held = {name: np.ascontiguousarray(value) for name, value in feeds.items()}  # alive while bound
        for name, value in self._held.items():
            binding.bind_cpu_input(name, value)
        # bound anew each step: ORT would otherwise write every step's logits into the first step's array (the
        # caller's earlier logits would change under it) and refuse a step of another width
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding, options)
        self.length += new
        return binding.get_outputs()[0].numpy()
