"""A tiny BERT whose WordPiece tokenizer knows the words of `builtin:slots`, for the token-classification tests.

Some words split into several sub-tokens ("21.5" -> "21", ".", "5"; "dehumidifier" -> "de", "##hum", ...), so
the first-sub-token rule is exercised.
"""

from __future__ import annotations

from pathlib import Path

from edgelora.token_data import generate_slots

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
SPLIT_WORDS = {"dehumidifier": ["de", "##hum", "##idi", "##fier"], "thermostat": ["thermo", "##stat"]}


def slot_vocab() -> list[str]:
    words: set[str] = set()
    for split in ("train", "heldout"):
        for record in generate_slots(400, 0, split):
            words.update(record["text"].replace(".", " . ").split())
    pieces = [p for w in sorted(words) for p in SPLIT_WORDS.get(w, [w])]
    extra = ["hello", "world", ",", "!", "?", "##s"] + [f"w{i}" for i in range(40)]  # >= 100 ids: export traces ids < 100
    return SPECIAL + sorted(set(pieces + extra) - set(SPECIAL))


def write_slot_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.processors import TemplateProcessing

    vocab = {w: i for i, w in enumerate(slot_vocab())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = BertNormalizer(lowercase=True)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]",
                                            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def tiny_config(num_labels: int | None = None):
    from transformers import BertConfig

    extra = {} if num_labels is None else {"num_labels": num_labels}
    return BertConfig(vocab_size=len(slot_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **extra)


def write_slot_bert(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny BertModel (save_pretrained) and the slot tokenizer in `directory`."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    BertModel(tiny_config()).eval().save_pretrained(directory)
    write_slot_tokenizer(directory)
    return directory
