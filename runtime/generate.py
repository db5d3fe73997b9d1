"""Text generation with a decoder bundle: prefill the prompt in one run, then one token per run with the KV cache.

The graph follows the decoder contract (Optimum's decoder-with-past convention): inputs `input_ids`,
`attention_mask` (past + new), `position_ids` and `past_key_values.{i}.key|value`; outputs `logits` and
`present.{i}.key|value`, fed back as the next run's past. A batch is left-padded; every row stops on its own
(an eos id or a stop string) and is fed padding until the longest is done, so in fp32 each row decodes the
tokens it decodes alone. Imports no torch.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import (
    CAUSAL_LM,
    LOGITS_TO_KEEP,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    Generation,
    Manifest,
    read_manifest,
)
from edgelora.runtime.chat import ChatTemplate, check_messages
from edgelora.runtime.fidelity import next_token_logprobs
from edgelora.runtime.sampling import Sampling, next_token
from edgelora.runtime.session import first_line
from edgelora.runtime.shared_kv import SharedKV, bindable, shares_kv
from edgelora.runtime.textstream import Detokenizer, StopText

Prompt = str | Sequence[Mapping[str, object]]  # plain text, or chat messages rendered by the bundle's template
# rows' adapters -> (RunOptions, extra feeds) for one session run: `Runtime.row_options`
RowOptions = Callable[[Sequence[str | None]], tuple[ort.RunOptions, dict[str, np.ndarray]]]


@dataclass
class GenerationStats:
    """Figures of the last call: tokens and seconds, with the time spent inside session.run apart."""

    prompt_tokens: list[int] = field(default_factory=list)  # per row, after any truncation
    token_ids: list[list[int]] = field(default_factory=list)  # per row, the generated ids (no eos)
    prefill_s: float = 0.0  # the first run (the whole prompt) and its token: the first-token latency
    decode_s: float = 0.0  # every later step, loop included
    decode_runs: int = 0
    decode_session_s: float = 0.0  # of decode_s, inside session.run

    @property
    def new_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def overhead_per_token_s(self) -> float:
        """Python-side time per decode step: the loop minus session.run."""
        return (self.decode_s - self.decode_session_s) / self.decode_runs if self.decode_runs else 0.0


def _session(model: Path, threads: int | None, spinning: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
        first = first_line(e)
        raise EdgeloraError(f"{model}: onnxruntime cannot load it ({first}); re-export the bundle") from None


@dataclass(frozen=True)
class TokenScore:
    """Log-probabilities (natural log, float64) the model gives each scored token, every one conditioned on all
    the tokens before it (teacher forcing); `nll` and `perplexity` summarise them."""

    logprobs: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.logprobs.size)

    @property
    def nll(self) -> float:
        """Summed negative log-likelihood of the scored tokens."""
        return float(-self.logprobs.sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.tokens)) if self.tokens else float("nan")


class Generator:
    """A decoder bundle ready to generate: its session, tokenizer, chat template and generation record.

    Example:
        >>> gen = Generator("bundles/smollm2-fp32")                                        # doctest: +SKIP
        >>> gen.generate([{"role": "user", "content": "Capital of France?"}], max_new_tokens=16)  # doctest: +SKIP
        'The capital of France is Paris.'

    Args:
        bundle_dir: the directory `edgelora export` wrote (manifest task "causal-lm").
        session, manifest, run_options: an already loaded session, its checked manifest and the RunOptions
            per adapter name (None: the plain model), as `Runtime` holds them; by default loaded here.
        row_options: for a batch whose rows use different adapters, rows' adapters -> (RunOptions, extra feeds)
            of one run (`Runtime.row_options`). A switchable bundle loaded here gets its adapters and this
            from a `Runtime` over the same session.
        intra_op_threads, allow_spinning: for a session loaded here (see `Runtime`).
    """

    def __init__(self, bundle_dir: str | os.PathLike, *, session: ort.InferenceSession | None = None,
                 manifest: Manifest | None = None, run_options: Mapping[str | None, ort.RunOptions] | None = None,
                 row_options: RowOptions | None = None, intra_op_threads: int | None = None,
                 allow_spinning: bool = True) -> None:
        self.bundle_dir = Path(bundle_dir)
        where = str(self.bundle_dir / MANIFEST_FILE)
        self.manifest = manifest if manifest is not None else read_manifest(self.bundle_dir)
        if self.manifest.task != CAUSAL_LM or self.manifest.generation is None:
            raise EdgeloraError(f"{where}: task is {self.manifest.task!r}, not {CAUSAL_LM!r}: this bundle does not "
                                "generate text; use `edgelora run` (Runtime.run/predict) for it")
        self.spec: Generation = self.manifest.generation
        self._runtime = None  # a switchable bundle loaded here: the Runtime holding its session and adapters
        if session is None and self.manifest.mode == "switchable":
            from edgelora.runtime.runtime import Runtime

            self._runtime = Runtime(self.bundle_dir, intra_op_threads=intra_op_threads, allow_spinning=allow_spinning)
            session, run_options, row_options = self._runtime.session, self._runtime._run_options, \
                self._runtime.row_options
        self.session = session or _session(self.bundle_dir / MODEL_FILE, intra_op_threads, allow_spinning)
        self._check_graph()
        self.tokenizer = self._load_tokenizer()
        self.chat_template = ChatTemplate.from_bundle(self.bundle_dir, self.spec.chat_template)
        names = list(self.manifest.adapter_names)
        if run_options is None and self.manifest.mode == "switchable":  # a session given without its adapters
            raise EdgeloraError(f"{self.bundle_dir}: a switchable bundle's session needs its adapters' run_options "
                                "too; pass run_options and row_options (Runtime.generator() does), or no session")
        if run_options is None:  # a merged bundle: its adapter (if any) is baked into the one graph
            plain = ort.RunOptions()
            run_options = {None: plain, **{n: plain for n in names}}
        self._run_options = dict(run_options)
        self._row_options = row_options
        self.adapters = tuple(names)
        self.stats = GenerationStats()

    # -- loading ---------------------------------------------------------------------------------

    def _check_graph(self) -> None:
        model = self.bundle_dir / MODEL_FILE
        L = self.spec.num_layers
        self._past = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        self._present = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in ("input_ids", "attention_mask", *self._past) if n not in inputs]
        missing += [n for n in ("logits", *self._present) if n not in outputs]
        if missing:
            raise EdgeloraError(f"{model}: lacks {missing[:4]} of the decoder contract for "
                                f"generation.num_layers={L}; re-export the bundle")
        self._positions = "position_ids" in inputs
        # generation reads the last position's logits only; older bundles compute them for every position
        optional = {i.name for i in self.session.get_overridable_initializers()}
        self._keep_last = {LOGITS_TO_KEEP: np.asarray(1, np.int64)} if LOGITS_TO_KEEP in optional else {}
        self._outputs = ["logits", *self._present]
        # a GroupQueryAttention bundle decodes into one cache buffer per tensor, written in place (runtime/shared_kv)
        self.shared_kv = shares_kv(self.manifest.extra.get("graph"))

    def _load_tokenizer(self):
        from tokenizers import Tokenizer

        spec = self.manifest.tokenizer
        path = self.bundle_dir / (spec.file if spec is not None else TOKENIZER_FILE)
        if not path.is_file():
            raise EdgeloraError(f"{path}: missing; a causal-lm bundle carries its tokenizer, re-export it")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise EdgeloraError(f"{path}: not a readable tokenizers JSON file ({e}); re-export the bundle") from None
        tok.no_truncation()
        tok.no_padding()
        return tok

    # -- prompts ---------------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text with the tokenizer's special tokens (as transformers' tokenizer(text)),
        or messages rendered by the chat template with a generation prompt, tokenized as they stand."""
        if isinstance(prompt, str):
            if not prompt:
                raise EdgeloraError("prompt is empty; pass some text or a list of messages")
            return self.tokenizer.encode(prompt, add_special_tokens=True).ids
        check_messages(prompt)
        if self.chat_template is None:
            raise EdgeloraError(f"{self.bundle_dir}: the bundle has no chat template; pass a plain text prompt "
                                "instead of messages")
        return self.tokenizer.encode(self.chat_template.render(prompt), add_special_tokens=False).ids

    def _options(self, adapter: str | None) -> ort.RunOptions:
        if adapter in self._run_options:
            return self._run_options[adapter]
        have = ", ".join(repr(a) for a in self.adapters) or "no adapter"
        if self.manifest.mode == "merged":
            raise EdgeloraError(f"{self.bundle_dir}: merged decoder bundle has {have} baked in, not adapter "
                                f"{adapter!r}; pass adapter=None{' or that name' if self.adapters else ''}")
        raise EdgeloraError(f"{self.bundle_dir}: no adapter {adapter!r}; available: {have} (or None)")

    def row_options(self, adapters: Sequence[str | None]) -> tuple[ort.RunOptions, dict[str, np.ndarray]]:
        """The RunOptions and extra feeds of one run whose row i uses `adapters[i]` (None: the plain base):
        one adapter for all rows needs no extra feed; different ones need the bundle's adapter bank."""
        rows = list(adapters)
        options = {name: self._options(name) for name in dict.fromkeys(rows)}  # unknown names refused here
        if len({id(o) for o in options.values()}) == 1:
            return options[rows[0]], {}
        if self._row_options is None:
            raise EdgeloraError(f"{self.bundle_dir}: a {self.manifest.mode} decoder bundle cannot mix adapters in "
                                "one batch; export it with mode='switchable'")
        return self._row_options(rows)

    def _fit(self, ids: list[list[int]], max_new_tokens: int, truncate: bool) -> tuple[list[list[int]], int]:
        """Prompts and max_new_tokens within the context: the longest prompt plus the new tokens must fit.
        A prompt of the context's length or more is refused, or with `truncate` cut from the left; then
        max_new_tokens is capped to the room left."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise EdgeloraError(f"max_new_tokens {max_new_tokens!r} must be a positive integer")
        C = self.spec.context_length
        if truncate:  # a prompt the context cannot hold keeps its end, with room for the new tokens (up to C/2)
            keep = C - min(max_new_tokens, C // 2)
            cut = [len(p) for p in ids if len(p) >= C]
            if cut:
                warnings.warn(f"prompt of {max(cut)} tokens cut from the left to its last {keep} (truncate=True): "
                              f"the context is {C} tokens", RuntimeWarning, stacklevel=4)
                ids = [p[-keep:] if len(p) >= C else p for p in ids]
        longest = max(len(p) for p in ids)
        if longest >= C:
            raise EdgeloraError(f"prompt is {longest} tokens, the bundle's context_length is {C}: shorten it to at "
                                f"most {C - 1} tokens or pass truncate=True to keep its end")
        if longest + max_new_tokens > C:
            warnings.warn(f"max_new_tokens {max_new_tokens} with a {longest}-token prompt exceeds the context of "
                          f"{C} tokens; capped to {C - longest}", RuntimeWarning, stacklevel=4)
            max_new_tokens = C - longest
        return ids, max_new_tokens

    # -- decoding --------------------------------------------------------------------------------

    def _run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions) -> tuple[np.ndarray, list[np.ndarray]]:
        try:
            values = self.session.run(self._outputs, feeds, options)
        except Exception as e:  # noqa: BLE001
            first = first_line(e)
            raise EdgeloraError(f"{self.bundle_dir / 'model.onnx'}: run failed ({first}); re-export the bundle") \
                from None
        return values[0], values[1:]

    def shares_cache(self, options: ort.RunOptions, feeds: Mapping[str, np.ndarray]) -> bool:
        """Whether decode steps with these options and feeds can run on one cache buffer per tensor: a `gqa`
        bundle, no adapter activated through the options (ONNX Runtime applies active adapters to runs given
        feeds, not to IOBinding runs) and every feed a graph input (IOBinding cannot bind an overridable
        initializer, such as a mixed batch's `adapter_ids`)."""
        return self.shared_kv and options is self._run_options.get(None) and bindable(self.session, feeds)

    def _step_shared(self, kv: SharedKV, feeds: dict[str, np.ndarray], options: ort.RunOptions) -> np.ndarray:
        try:
            return kv.step(feeds, options)
        except EdgeloraError:
            raise
        except Exception as e:  # noqa: BLE001
            first = first_line(e)
            raise EdgeloraError(f"{self.bundle_dir / 'model.onnx'}: run failed ({first}); re-export the bundle") \
                from None

    def _start(self, prompts: Sequence[Prompt], adapters: Sequence[str | None], max_new_tokens: int,
               temperature: float, top_p: float, top_k: int, stop: str | Sequence[str], seed: int | None,
               truncate: bool) -> Iterator[tuple[int, str]]:
        """Check every argument now (errors and warnings reach the caller before the first token), then return
        the decoding loop's (row, text piece) events."""
        sampling = Sampling(temperature, top_p, top_k)
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) for s in stops):
            raise EdgeloraError(f"stop {stop!r}: pass a string or a list of strings")
        if len(adapters) != len(prompts):
            raise EdgeloraError(f"generate_batch: {len(adapters)} adapters for {len(prompts)} prompts; pass one "
                                "adapter name (or None) per prompt")
        options, extra = self.row_options(adapters)
        ids, max_new_tokens = self._fit([self.prompt_ids(p) for p in prompts], max_new_tokens, truncate)
        return self._events(ids, options, extra, max_new_tokens, sampling, stops, seed)

    def _events(self, ids: list[list[int]], options: ort.RunOptions, extra: Mapping[str, np.ndarray],
                max_new_tokens: int, sampling: Sampling, stop: Sequence[str],
                seed: int | None) -> Iterator[tuple[int, str]]:
        """(row, text piece) as the rows decode; pieces of a row concatenate to its reply."""
        B, T = len(ids), max(len(p) for p in ids)
        eos = set(self.spec.eos_token_ids)
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else next(iter(self.spec.eos_token_ids), 0)
        # each row draws from its own generator seeded alike: a row samples in a batch what it samples alone
        rngs = [np.random.default_rng(seed) for _ in range(B)] if not sampling.greedy else [None] * B
        detoks = [Detokenizer(self.tokenizer) for _ in range(B)]
        stops = [StopText(stop) for _ in range(B)]
        live = [True] * B
        self.stats = stats = GenerationStats(prompt_tokens=[len(p) for p in ids], token_ids=[[] for _ in range(B)])

        mask = np.zeros((B, T), np.int64)
        input_ids = np.full((B, T), pad, np.int64)
        for r, p in enumerate(ids):  # left padding
            input_ids[r, T - len(p):] = p
            mask[r, T - len(p):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # (B, T)
        empty = np.zeros((B, self.spec.num_kv_heads, 0, self.spec.head_dim), np.float32)
        past = [empty] * len(self._past)

        kv: SharedKV | None = None  # after the prompt's run, for a bundle whose cache is one buffer per tensor
        for step in range(max_new_tokens):
            feeds = {"input_ids": input_ids, "attention_mask": mask, **extra}
            if self._positions:
                feeds["position_ids"] = positions
            t0 = time.perf_counter()
            if kv is None:
                logits, past = self._run({**feeds, **dict(zip(self._past, past)), **self._keep_last}, options)
                if max_new_tokens > 1 and self.shares_cache(options, feeds):
                    kv = SharedKV.holding(self.session, self._past, self._present, past, max_new_tokens - 1)
                    past = []
            else:
                logits = self._step_shared(kv, feeds, options)
            ran = time.perf_counter() - t0  # inside session.run
            chosen = np.full((B, 1), pad, np.int64)
            for r in range(B):
                if not live[r]:
                    continue
                tok = next_token(logits[r, -1], sampling, rngs[r])
                if tok in eos:
                    live[r] = False
                    continue
                chosen[r, 0] = tok
                stats.token_ids[r].append(tok)
                piece = stops[r].push(detoks[r].add(tok))
                if stops[r].stopped:
                    live[r] = False
                if piece:
                    t_out = time.perf_counter()
                    yield r, piece
                    t0 += time.perf_counter() - t_out  # the caller's time with the piece is not ours
            if step == 0:
                stats.prefill_s = time.perf_counter() - t0
            else:
                stats.decode_runs += 1
                stats.decode_session_s += ran
                stats.decode_s += time.perf_counter() - t0
            if not any(live) or step == max_new_tokens - 1:
                break
            t2 = time.perf_counter()
            input_ids = chosen
            mask = np.concatenate([mask, np.asarray(live, np.int64)[:, None]], axis=1)
            positions = positions[:, -1:] + 1
            stats.decode_s += time.perf_counter() - t2  # building the next feeds is loop time too
        for r in range(B):
            tail = stops[r].push(detoks[r].flush()) if not stops[r].stopped else ""
            tail += stops[r].flush()
            if tail:
                yield r, tail

    # -- scoring ---------------------------------------------------------------------------------

    def _token_logprobs(self, ids: list[int], first: int, adapter: str | None) -> np.ndarray:
        """Log-probabilities of ids[first:], each given the ids before it, from one prefill run."""
        C = self.spec.context_length
        if len(ids) > C:
            raise EdgeloraError(f"text is {len(ids)} tokens, the bundle's context_length is {C}: score at most {C} "
                                "tokens at a time")
        options = self._options(adapter)
        T = len(ids)
        empty = np.zeros((1, self.spec.num_kv_heads, 0, self.spec.head_dim), np.float32)
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, T), np.int64),
                 **dict.fromkeys(self._past, empty)}
        if self._positions:
            feeds["position_ids"] = np.arange(T, dtype=np.int64)[None]
        logits, _ = self._run(feeds, options)
        return next_token_logprobs(logits[0, first - 1 :], ids[first - 1 :])  # row t predicts token t + 1

    def score(self, prompt: Prompt | None, completion: str, adapter: str | None = None) -> TokenScore:
        """How likely the model finds `completion` after `prompt`: the log-probability of each completion token.

        The prompt is tokenized as `generate` tokenizes it (text with special tokens, or messages through the
        chat template with a generation prompt) and the completion after it without special tokens, so the
        completion is scored as the answer `generate` would have to produce. With `prompt` None the
        completion is a text on its own: tokenized with special tokens and scored from its second token.
        """
        if not isinstance(completion, str) or not completion:
            raise EdgeloraError("completion is empty; pass the text to score")
        if prompt is None:
            return self.score_ids(self.tokenizer.encode(completion, add_special_tokens=True).ids, adapter)
        head = self.prompt_ids(prompt)
        tail = self.tokenizer.encode(completion, add_special_tokens=False).ids
        return TokenScore(self._token_logprobs(head + tail, len(head), adapter))

    def score_ids(self, ids: Sequence[int], adapter: str | None = None) -> TokenScore:
        """Log-probabilities of ids[1:], each given the ids before it: a text already tokenized (the bench gives
        every candidate the same ids)."""
        ids = [int(i) for i in ids]
        return TokenScore(self._token_logprobs(ids, 1, adapter) if len(ids) > 1 else np.zeros(0))

    def perplexity(self, texts: Sequence[str | tuple[Prompt, str]], adapter: str | None = None) -> float:
        """exp of the mean negative log-likelihood per token over all `texts` (each a text, scored from its
        second token, or a (prompt, completion) pair, its completion scored; see `score`)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise EdgeloraError("perplexity: pass a non-empty list of texts or (prompt, completion) pairs")
        nll, count = 0.0, 0
        for item in texts:
            s = self.score(*item, adapter=adapter) if isinstance(item, tuple) else self.score(None, item, adapter)
            nll, count = nll + s.nll, count + s.tokens
        if not count:
            raise EdgeloraError("perplexity: the texts hold no token to score (each needs two tokens or more)")
        return float(np.exp(nll / count))

    # -- public API ------------------------------------------------------------------------------

    def stream(self, prompt: Prompt, adapter: str | None = None, *, max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] = (),
               seed: int | None = None, truncate: bool = False) -> Iterator[str]:
        """The reply piece by piece as it decodes (an iterator; arguments are checked at the call, before
        any decoding); the pieces concatenate to `generate`'s text.

        Args:
            prompt: text (tokenized with the tokenizer's special tokens) or chat messages
                [{"role": ..., "content": ...}] (rendered by the bundle's chat template).
            adapter: None (the plain base) or an adapter's name: the one baked into a merged bundle, or any of a
                switchable bundle's.
            temperature: 0 decodes greedily; above 0 samples, after top_k (0: off) then top_p (1.0: off).
            stop: strings that end the reply; the stop string itself is not returned.
            seed: the sampling seed: the same seed gives the same text (None: a fresh one).
            truncate: cut a prompt that does not fit the context from the left (with a warning) instead of
                refusing it.
        """
        events = self._start([prompt], [adapter], max_new_tokens, temperature, top_p, top_k, stop, seed, truncate)
        return (piece for _, piece in events)

    def generate(self, prompt: Prompt, adapter: str | None = None, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] = (),
                 seed: int | None = None, truncate: bool = False) -> str:
        """The reply to `prompt` as one string; arguments as for `stream`."""
        events = self._start([prompt], [adapter], max_new_tokens, temperature, top_p, top_k, stop, seed, truncate)
        return "".join(piece for _, piece in events)

    def generate_batch(self, prompts: Sequence[Prompt], adapter: str | None = None, *,
                       adapters: Sequence[str | None] | None = None, max_new_tokens: int = 128,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] = (),
                       seed: int | None = None, truncate: bool = False) -> list[str]:
        """Replies to several prompts decoded together (left-padded, one session run per step); each row
        stops on its own. Greedy fp32 rows equal their solo `generate`; arguments as for `stream`.

        Args:
            adapters: instead of `adapter` for all, one adapter (or None) per prompt: a switchable bundle
                runs the mixed batch in one session run per step through its adapter bank, and each row
                decodes what it decodes alone.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise EdgeloraError("generate_batch: pass a non-empty list of prompts (texts or message lists)")
        if adapters is not None and adapter is not None:
            raise EdgeloraError("generate_batch: pass adapter= (one for the batch) or adapters= (one per prompt), "
                                "not both")
        if adapters is not None and (isinstance(adapters, str) or not isinstance(adapters, Sequence)):
            raise EdgeloraError(f"generate_batch: adapters={adapters!r}; pass a list with one adapter name (or None) "
                                "per prompt")
        rows = list(adapters) if adapters is not None else [adapter] * len(prompts)
        texts = [""] * len(prompts)
        events = self._start(list(prompts), rows, max_new_tokens, temperature, top_p, top_k, stop, seed, truncate)
        for r, piece in events:
            texts[r] += piece
        return texts
