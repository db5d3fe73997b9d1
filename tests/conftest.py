"""Toy bases, a toy tokenizer and adapter helpers shared by the tests; nothing is downloaded.

Every base is a randomly initialised Hugging Face model two layers deep with hidden size 32, built
here from a config: BERT, DistilBERT, GPT-2 (Conv1D projections) and Llama-style. `BASES` is the
table the layer and format tests parametrize over.

Helpers (import them: `from conftest import make_base, ...`; pytest puts tests/ on sys.path):
    make_base(kind, seed)      a fresh tiny base; the same (kind, seed) gives the same weights and fingerprint.
    make_inputs(kind)          a right-padded batch of 3 x 7 random token ids (+ token_type_ids for BERT).
    randomize_adapters(model)  random non-zero LoRA B / bottleneck up, for equivalence tests.
    write_tokenizer(dir)       the toy WordLevel tokenizer.json.

Fixtures other test files may reuse:
    tiny_bert_dir   (session) a directory holding a tiny BERT (`save_pretrained`) and `tokenizer.json`,
                    so `edgelora.model.load_base(dir)` and `edgelora.tokenize.load_tokenizer(dir)` work.
    tokenizer_dir   (session) a directory holding only the tiny WordLevel `tokenizer.json`.
    tokenizer       the tiny tokenizer loaded through `edgelora.tokenize.load_tokenizer`.
    base            parametrized over `BASES`: a fresh tiny base in eval mode (seed 0).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

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
