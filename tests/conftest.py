"""Toy bases, a toy tokenizer and adapter helpers shared by the tests; nothing is downloaded.

Every base is a randomly initialised Hugging Face model two layers deep with hidden size 32, built
here from a config: BERT, DistilBERT, GPT-2 (Conv1D projections) and Llama-style. `BASES` is the
table the layer and format tests parametrize over.

Helpers (import them: `from conftest import make_base, ...`; pytest puts tests/ on sys.path):
    make_base(kind, seed)      a fresh tiny base; the same (kind, seed) gives the same weights and fingerprint.
    make_inputs(kind)          a right-padded batch of 3 x 7 random token ids (+ token_type_ids for BERT).
    randomize_adapters(model)  random non-zero LoRA B / bottleneck up, for equivalence tests.
    write_tokenizer(dir)       the toy WordLevel tokenizer.json.
    write_jsonl(path)          60 labelled JSONL lines ("good" -> pos, "bad" -> neg) for CLI tests.
    assert_one_line_error(rc, err, fragment)  a user's mistake as the CLI must report it.
    FP32_ATOL, INT8_LAYER_REL_TOL, INT8_MIN_COSINE, TRACKS_FAKE_QUANT_FACTOR, MIN_ADAPTER_EFFECT, WEIGHT_BITS:
                               tolerances and settings the export tests share (each explained where defined).
The hand-built tiny bundle for the runtime, bench and serve tests is in tests/tiny_bundle.py.

Fixtures other test files may reuse:
    tiny_bert_dir   (session) a directory holding a tiny BERT (`save_pretrained`) and `tokenizer.json`,
                    so `edgelora.model.load_base(dir)` and `edgelora.tokenize.load_tokenizer(dir)` work.
    tokenizer_dir   (session) a directory holding only the tiny WordLevel `tokenizer.json`.
    tokenizer       the tiny tokenizer loaded through `edgelora.tokenize.load_tokenizer`.
    base            parametrized over `BASES`: a fresh tiny base in eval mode (seed 0).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgelora.train import TrainConfig

# Toy models are far too small to gain from intra-op threads, and on a shared machine idle OpenMP
# workers spinning against other processes made each forward ~50x slower (0.25 s instead of 5 ms).
torch.set_num_threads(1)

BASES = ("bert", "distilbert", "gpt2", "llama")
VOCAB_SIZE = 120
HIDDEN = 32
SEQ = 7
# Words of the toy vocabulary: a few meaningful ones for the synthetic training task, then fillers.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = ["alpha", "beta", "the", "a", "film", "movie", "good", "bad", "is", "was"]
WORDS += [f"w{i}" for i in range(100 - len(WORDS))]


def make_base(kind: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised base of architecture `kind`, eager attention, eval mode.

    The same (kind, seed) always gives the same weights, hence the same fingerprint.
    """
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "bert":
        config = tf.BertConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64,
        )
        model = tf.BertModel(config)
    elif kind == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=VOCAB_SIZE, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        )
        model = tf.DistilBertModel(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=64, n_positions=64, bos_token_id=0, eos_token_id=0)
        model = tf.GPT2Model(config)
    elif kind == "llama":
        config = tf.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        model = tf.LlamaModel(config)
    else:
        raise ValueError(f"unknown toy base {kind!r}; choose from {BASES}")
    model.config._attn_implementation = "eager"
    return model.eval()


def make_inputs(kind: str, batch: int = 3, seq: int = SEQ, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with a right-padded attention mask (one short row), as `AdapterModel.forward` takes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB_SIZE, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0  # (batch, seq): the last row is half padding
    feeds = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        feeds["token_type_ids"] = torch.zeros_like(ids)
    return feeds


@pytest.fixture(params=BASES)
def base(request: pytest.FixtureRequest) -> nn.Module:
    return make_base(request.param)


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every zero-initialised adapter tensor (LoRA B, bottleneck up) random values.

    Equivalence tests call this and then assert that the adapter changes the output, so a zero
    adapter (the identity) can never make a merge or round-trip test pass by accident.
    """
    from edgelora.layers import AdaptedLinear

    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, AdaptedLinear):
            continue
        for lin in module.lora_B.values():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
        for bottleneck in module.bottleneck.values():
            bottleneck.up.weight.copy_(torch.randn(bottleneck.up.weight.shape, generator=g) * std)
            bottleneck.up.bias.copy_(torch.randn(bottleneck.up.bias.shape, generator=g) * std)


def write_tokenizer(directory: Path) -> Path:
    """Save a WordLevel tokenizer ([PAD] [UNK] [CLS] [SEP] + 100 words, whitespace split) as tokenizer.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory)
    return directory


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    from edgelora.tokenize import load_tokenizer

    return load_tokenizer(tokenizer_dir, max_length=32)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved with `save_pretrained` plus the toy `tokenizer.json`: a base directory for
    `load_base(dir)` / `load_tokenizer(dir)` and for CLI or export tests. Session-scoped: do not modify it."""
    directory = tmp_path_factory.mktemp("tiny_bert")
    make_base("bert").save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def make_keyword_task(n: int, seed: int, filler: list[str], labels: list[str]) -> tuple[list[str], list[int]]:
    """`n` texts of 3-6 filler words with the class's keyword inserted at a random place; classes alternate."""
    rng = random.Random(seed)
    texts, ys = [], []
    for i in range(n):
        words = rng.sample(filler, rng.randint(3, 6))
        words.insert(rng.randint(0, len(words)), labels[i % 2])
        texts.append(" ".join(words))
        ys.append(i % 2)
    return texts, ys


# --- the command line ---------------------------------------------------------------------------------------
# Two classes told apart by one word; the rest is filler from the toy vocabulary.
CUE_FILLER = [w for w in WORDS if w not in ("good", "bad")]


def write_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    """`n` examples: a "good" text is "pos", a "bad" text is "neg", four filler words around the cue."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            label = ("neg", "pos")[i % 2]
            words = rng.sample(CUE_FILLER, 4)
            words.insert(rng.randrange(5), "good" if label == "pos" else "bad")
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def assert_one_line_error(rc: int, err: str, fragment: str) -> None:
    """A user's mistake: exit 2 and exactly one `edgelora: error:` line holding `fragment`, no traceback."""
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("edgelora: error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


# --- tolerances shared by the export tests (a file's own bounds stay in that file) --------------------------
# fp32 ONNX vs torch: the same float ops summed in another order. Measured <= 3e-6 on these toy bases
# (hidden values ~1 after LayerNorm); 1e-4 leaves >30x headroom, while a wrong weight, a transposed
# Conv1D or a lost adapter branch moves the outputs by >= MIN_ADAPTER_EFFECT.
FP32_ATOL = 1e-4
# One int8 layer (or a whole QAttention) vs the fake-quant product of the same input: the integer products
# are exact, only the final float rescale rounds (measured ~3e-7 relative with 7-bit weights). A saturating
# 8-bit kernel shows ~1e-1 and a wrong scale or weight layout far more.
INT8_LAYER_REL_TOL = 1e-4
# int8 ONNX vs fake-quant torch end to end: one ulp of float difference can flip an activation's uint8
# rounding and flips compound over layers, so no max-abs bound is fair; two layers leave little room to
# compound (measured worst cosine 1 - 1e-7), and 0.99 still catches a graph that is wrong as a whole.
INT8_MIN_COSINE = 0.99
# The int8 graph reproduces the fake quantizer's rounding, not merely the float model: its mean distance
# to fake-quant torch must be this many times smaller than to fp32 torch. Usually it is ~1e4 times; but
# the activation scale is per tensor, so one ulp at a batch's extreme shifts every row's uint8 rounding,
# and one toy batch in five measured only 13 times. 3 stays robust to that and still fails a graph that
# merely approximates the float model.
TRACKS_FAKE_QUANT_FACTOR = 3
# A randomized adapter must move the outputs at least this much, or an equivalence test proves nothing.
MIN_ADAPTER_EFFECT = 1e-2


def assert_each_adapter_changes_output(model: nn.Module, names, feeds: dict[str, torch.Tensor]) -> None:
    """Every adapter in `names` moves `model.encode(**feeds)` by more than MIN_ADAPTER_EFFECT from the plain
    base, so a test comparing paths through it cannot pass with an identity adapter."""
    with torch.no_grad():
        model.set_adapter(None)
        plain = model.encode(**feeds)
        for name in names:
            model.set_adapter(name)
            assert (model.encode(**feeds) - plain).abs().max() > MIN_ADAPTER_EFFECT, f"adapter {name} is an identity"
# 7-bit weights never saturate ORT's int8 kernels (AVX2 without VNNI included), so the int8 numbers
# above hold on whatever CPU runs the tests; the export is told so rather than left to detect the CPU.
WEIGHT_BITS = 7


# --- comparisons shared by the export tests ---------------------------------------------------------------
def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).mean())


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path: what a test compares before and after."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def unread_initializers(proto) -> list[str]:
    """Initializers of an ONNX model that no node reads and no graph input overrides: dead weight in a bundle."""
    read = {t for n in proto.graph.node for t in n.input} | {i.name for i in proto.graph.input}
    return [i.name for i in proto.graph.initializer if i.name not in read]


# --- a short keyword-classification run and a CLI workspace (resume, atomic writes, errors, smoothing) ----------
KEYWORD_LABELS = ["alpha", "beta"]
KEYWORD_FILLER = [w for w in WORDS if w not in ("alpha", "beta", "good", "bad")]


def keyword_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of filler words with 'alpha' (class 0) or 'beta' (class 1) among them."""
    return make_keyword_task(n, seed, KEYWORD_FILLER, KEYWORD_LABELS)


def write_keyword_jsonl(path: Path, n: int = 60) -> Path:
    """`keyword_task(n, seed=0)` as JSONL lines with label names."""
    texts, labels = keyword_task(n, seed=0)
    path.write_text("".join(json.dumps({"text": t, "label": KEYWORD_LABELS[y]}) + "\n" for t, y in zip(texts, labels)))
    return path


KEYWORD_TRAIN = keyword_task(40, seed=1)  # 5 steps per epoch at batch 8
KEYWORD_EVAL = keyword_task(16, seed=2)
KEYWORD_CONFIG = TrainConfig(epochs=3, batch_size=8, lr=1e-2, seed=3, device="cpu")


class Crash(Exception):
    """Stands in for a crash: raised from the progress callback after a given step."""


def crash_after(step: int) -> Callable[[int, nn.Module], None]:
    """A training `on_step` hook that raises `Crash` once `step` steps are done."""
    def on_step(done: int, model: nn.Module) -> None:
        if done == step:
            raise Crash(step)

    return on_step


def cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `edgelora.cli.main` in-process on `argv` (paths allowed); (exit code, stdout, stderr)."""
    from edgelora.cli import main

    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped): what a killed writer leaves in its names."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@dataclass
class Workspace:
    """The `workspace` fixture: paths of a tiny base, an adapter, a bundle and a data file; `tmp` is the test's own."""

    base: Path
    adapter: Path
    bundle: Path
    data: Path
    root: Path
    tmp: Path | None = None

    def copy(self, what: str) -> Path:
        """A private copy of the base, adapter or bundle to damage."""
        dst = self.tmp / what
        shutil.copytree(getattr(self, what), dst)
        return dst


@pytest.fixture(scope="module")
def workspace(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The tiny base, an adapter "task" saved from it, a switchable fp32 bundle of it and a keyword JSONL file.
    Module-scoped: tests copy what they damage (`Workspace.copy`) into their own `tmp`."""
    from edgelora.config import LoraConfig
    from edgelora.exporters.export import export_bundle
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter

    root = tmp_path_factory.mktemp("workspace")
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("task", LoraConfig(r=2), labels=["neg", "pos"])
    save_adapter(model, "task", root / "task")
    export_bundle(str(tiny_bert_dir), {"task": root / "task"}, mode="switchable", precision="fp32", out=root / "bundle")
    return Workspace(base=tiny_bert_dir, adapter=root / "task", bundle=root / "bundle",
                     data=write_keyword_jsonl(root / "train.jsonl"), root=root)
