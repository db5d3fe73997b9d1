"""Text-classification datasets for adapter training: JSONL/CSV loaders and two builtin tasks.

The builtin tasks (`intent`, `sentiment`) are synthetic, generated from seeded templates because no labelled
text ships offline here; negation, corrections and contrast make a bag of keywords fall short of solving them.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelora.errors import EdgeloraError

BUILTIN_TASKS = ("intent", "sentiment")
DEFAULT_BUILTIN_SIZE = 2000  # examples in `builtin:<task>` when no `:N` count is given
MIN_WORDS, MAX_WORDS = 4, 25
_EXTENSIONS = (".jsonl", ".csv")
_MAX_RETRIES = 200  # draws per example before a task is declared too small for the requested n


@dataclass(frozen=True)
class Dataset:
    """Texts with integer labels; `label_names[i]` names class i."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise EdgeloraError(f"Dataset has {len(self.texts)} texts but {len(self.labels)} labels; they must pair up")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise EdgeloraError(f"Dataset label {bad[0]} is out of range for {len(self.label_names)} label names")

    def __len__(self) -> int:
        return len(self.texts)


# --- synthetic tasks -------------------------------------------------------------------------------------
# Templates fill `{slot}` from _SLOTS, recursively. A leading "^" marks an imperative: it may take a polite
# prefix ("could you ...") and serve as either half of a correction ("X, no wait, Y" means Y). A leading "~"
# marks a held-out paraphrase: only the held-out stream draws it, so held-out accuracy measures
# generalisation to unseen wording, not recall of the training templates.
_SLOTS: dict[str, tuple[str, ...]] = {
    "room": ("kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "garage", "nursery",
             "dining room", "basement", "study", "guest room", "attic", "laundry room", "porch", "~sunroom", "~pantry"),
    "light": ("lights", "lamp", "ceiling light", "reading lamp", "light strip", "overhead lights", "lamps",
              "bulbs", "desk lamp", "fairy lights", "~chandelier", "~floor lamp"),
    "door": ("front door", "back door", "garage door", "side door", "patio door", "door", "gate", "~cellar door"),
    "genre": ("jazz", "rock", "classical music", "lo-fi", "country", "hip hop", "reggae", "blues",
              "piano music", "80s hits", "soul", "techno", "~bossa nova", "~k-pop"),
    "artist": ("Miles Davis", "Queen", "Adele", "Radiohead", "Bach", "Bob Marley", "Nina Simone", "the Beatles",
               "Daft Punk", "Dolly Parton", "~Chopin", "~ABBA"),
    "music": ("some {genre}", "{genre}", "my workout playlist", "the radio", "something by {artist}",
              "my chill playlist", "the new album by {artist}", "a bit of {genre}", "the music",
              "that song by {artist}", "~my dinner playlist"),
    "deg": tuple(str(t) for t in (*range(16, 29), *range(60, 80, 2))),
    "delta": ("two", "three", "a couple of", "a few", "five"),
    "when": ("today", "tomorrow", "tonight", "this weekend", "on Friday", "this afternoon", "tomorrow morning",
             "next week", "later today", "~on Sunday"),
    "city": ("Paris", "Oslo", "Chicago", "Tokyo", "Lagos", "Lima", "Berlin", "Seattle", "Mumbai", "Sydney", "~Denver"),
    "guest": ("my sister", "the cleaner", "the dog walker", "my parents", "the plumber", "a friend", "~the nanny"),
    "product": ("toaster", "phone", "laptop", "blender", "coffee maker", "vacuum", "backpack", "jacket",
                "keyboard", "monitor", "tent", "kettle", "smartwatch", "router", "mattress", "charger", "speaker",
                "camera", "desk chair", "air fryer", "~drone", "~treadmill"),
    "aspect": ("the price", "the design", "the build quality", "delivery", "customer support", "the setup",
               "the packaging", "the sound", "the color", "the quality", "the finish", "the app", "~the warranty"),
    "pos_adj": ("great", "excellent", "fantastic", "superb", "impressive", "lovely", "outstanding", "wonderful",
                "brilliant", "perfect", "~stellar", "~top-notch"),
    "neg_adj": ("terrible", "awful", "disappointing", "poor", "mediocre", "horrible", "dreadful", "lousy",
                "abysmal", "bad", "~atrocious", "~subpar"),
    "duration": ("a week", "two days", "a month", "three uses", "one afternoon", "ten days", "two weeks"),
    "period": ("a year", "six months", "three months", "a few weeks", "two years"),
    "relative": ("wife", "husband", "son", "daughter", "dad", "mom", "roommate", "partner"),
    "intro": ("", "", "", "bought this {product} last month. ", "got the {product} as a gift. ",
              "ordered the {product} for my {relative}. ", "been using this {product} for {period}. ",
              "my review of the {product}: ", "so, about this {product}: ", "~quick update on the {product}: "),
    "pos": ("{aspect} is {pos_adj}", "{aspect} is really {pos_adj}", "it still works like new after {period}",
            "I use it every single day", "it does exactly what it promises", "I would happily buy it again",
            "it exceeded my expectations", "my {relative} loves it", "it was worth every penny",
            "setup took two minutes", "it feels sturdy and well made", "I'm very happy with it",
            "~it's the best purchase I've made this year", "~it runs quietly and never overheats"),
    "neg": ("{aspect} is {neg_adj}", "{aspect} is really {neg_adj}", "it stopped working after {duration}",
            "it broke after {duration}", "I returned it after {duration}", "it feels flimsy and cheap",
            "I regret buying it", "it was a waste of money", "support never answered my emails",
            "it arrived damaged", "my {relative} hates it", "I'm very unhappy with it",
            "~the seams came apart within {duration}", "~I'm sending it back tomorrow"),
    "neg_event": ("it stops working after {duration}", "it shuts itself off every few minutes",
                  "the battery dies in an hour", "it squeaks every time I use it", "it broke after {duration}"),
    "neg_hobby": ("returning things", "waiting on hold with support", "buying spare parts", "reading error codes"),
}

_INTENTS: dict[str, tuple[str, ...]] = {
    "lights_on": ("^turn on the {light} in the {room}", "^switch the {room} {light} on", "{light} on in the {room}",
                  "it's too dark in the {room}", "I can't see a thing in the {room}", "^brighten up the {room}",
                  "^put the {light} on", "^light up the {room} for me", "the {room} needs some light",
                  "~^get the {light} going in the {room}", "~the {room} could use more light"),
    "lights_off": ("^turn off the {light} in the {room}", "^switch the {room} {light} off", "^kill the {light}",
                   "{light} off in the {room}", "it's way too bright in the {room}",
                   "we don't need the {light} on in the {room} anymore", "nobody is in the {room}, no {light} needed",
                   "^make the {room} dark", "^shut the {light} off", "~^darken the {room}",
                   "~the {light} in the {room} can go off now"),
    "play_music": ("^play {music}", "^put on {music} in the {room}", "^start playing {music}",
                   "I want to hear {music}", "^queue up {music}", "the {room} is too quiet, I'd like {music}",
                   "^resume the music", "^turn the music back on", "^keep the music going in the {room}",
                   "~I'm in the mood for {music}", "~^fire up {music}"),
    "stop_music": ("^stop the music", "^stop playing {music}", "^pause the music in the {room}",
                   "^turn off {music}", "enough {genre} for today", "I've had enough music, silence please",
                   "no more music in the {room}", "^cut the music, I'm on a call",
                   "^shut off whatever is playing in the {room}", "~^mute the speakers in the {room}",
                   "~I'm trying to sleep, kill the music"),
    "lock_door": ("^lock the {door}", "^make sure the {door} is locked", "^secure the {door}", "^bolt the {door}",
                  "I'm leaving, lock up the {door}", "don't leave the {door} unlocked",
                  "the {door} shouldn't stay unlocked overnight", "^lock up the {door} for the night",
                  "~^double-lock the {door}", "~is the {door} locked? lock it if not"),
    "unlock_door": ("^unlock the {door}", "^let {guest} in through the {door}", "^open the lock on the {door}",
                    "the delivery is here, unlock the {door}", "don't keep the {door} locked, {guest} is coming",
                    "^leave the {door} unlocked for {guest}", "^release the lock on the {door}",
                    "~^unbolt the {door}", "~^buzz {guest} in at the {door}"),
    "set_temperature": ("^set the temperature to {deg} degrees", "^set the {room} to {deg} degrees",
                        "^make it {deg} degrees in the {room}", "it's freezing in the {room}, turn up the heat",
                        "it's too warm in here, cool the {room} down", "^bump the thermostat up to {deg}",
                        "^lower the temperature by {delta} degrees", "^turn the heating on in the {room}",
                        "I'd like the {room} a bit warmer", "~^crank up the heat in the {room}",
                        "~I'm sweating in the {room}, make it cooler"),
    "weather_query": ("what's the weather {when}", "will it rain {when}", "how cold will it be in {city} {when}",
                      "what's the temperature outside {when}", "is it going to be warm {when}",
                      "do I need an umbrella {when}", "should I wear a coat {when}",
                      "what's the forecast for {city} {when}", "how many degrees is it in {city} right now",
                      "^tell me the weather {when}", "^check the forecast for {city}", "^read me the forecast for {when}",
                      "~any snow expected {when}", "~how hot is it going to get {when}"),
}
_PARTNER = {"lights_on": "lights_off", "play_music": "stop_music", "lock_door": "unlock_door",
            "set_temperature": "weather_query"}
_PARTNER |= {v: k for k, v in _PARTNER.items()}
_SHORT_CORRECTIONS = {
    "lights_on": ("turn the {room} {light} off, no wait, on", "{light} off... sorry, I meant on"),
    "lights_off": ("turn the {room} {light} on, no wait, off", "{light} on... sorry, I meant off"),
    "play_music": ("stop the music, no wait, keep it playing", "pause {music}... actually never mind, let it play"),
    "stop_music": ("play {music}, actually no, stop the music", "turn up the music, no wait, turn it off"),
    "lock_door": ("unlock the {door}, no sorry, lock it", "open the {door}, no wait, keep it locked"),
    "unlock_door": ("lock the {door}, no sorry, unlock it", "lock up the {door}... actually wait, unlock it"),
    "set_temperature": ("what's the weather {when}? actually, just set the {room} to {deg} degrees",),
    "weather_query": ("set the heat to {deg}, no wait, first tell me the weather {when}",),
}
_CORRECTIONS = ("{other}, no wait, {this}", "{other}... actually, {this}", "{other}. sorry, I meant {this}",
                "{other}, scratch that, {this}", "{other}, oh never mind, {this}",
                "~{other}, hmm, on second thought, {this}", "~{other}. wait, no. {this}")
_ANY_PREFIX = ("", "", "", "", "hey, ", "okay, ", "um, ", "hey assistant, ", "quick one, ", "~excuse me, ")
_POLITE_PREFIX = ("", "", "please ", "could you ", "can you ", "I need you to ", "would you ", "~kindly ")
_SUFFIX = ("", "", "", "", " please", ", thanks", " right now", " for me", " when you can", "~ asap")

# Sentiment: `{this}` is a clause of the label's polarity, `{other}` one of the opposite polarity; in a
# contrast the main clause (after "but", before "even though") carries the label.
_CONTRAST = ("{other} but {this}", "although {other}, {this}", "{this}, even though {other}",
             "{other}. however, {this}", "sure, {other}, but {this}", "{other}, and yet {this}",
             "~{other}; still, {this}", "~despite the fact that {other}, {this}")
_NEGATED = ("{aspect} is not {other_adj} at all", "{aspect} isn't {other_adj}", "I wouldn't call {aspect} {other_adj}",
            "I can't say {aspect} is {other_adj}", "{aspect} is far from {other_adj}",
            "nobody could call this {product} {other_adj}", "honestly, this {product} is not {other_adj}",
            "~{aspect} is anything but {other_adj}", "~I'd hardly call {aspect} {other_adj}")
_SENTIMENT_FIXED = {
    "positive": {
        "negated": ("not bad at all", "no complaints whatsoever", "I never had a single problem with it",
                    "I couldn't be happier", "nothing about it feels cheap", "I can't find anything wrong with it",
                    "it never let me down", "I don't regret buying it for a second", "~I can't fault it"),
        "tricky": ("I expected the worst, but {pos}", "I was ready to hate this {product}, but {pos}",
                   "my old {product} was {neg_adj}, this one is {pos_adj}",
                   "the reviews said {aspect} was {neg_adj}, but mine is {pos_adj}", "~I had low hopes, yet {pos}"),
    },
    "negative": {
        "negated": ("I wouldn't buy it again", "I can't recommend it", "it never worked properly",
                    "not worth the money", "I couldn't be more disappointed", "nothing about it works as advertised",
                    "it never lived up to the hype", "I don't think it was worth buying",
                    "~I wouldn't wish it on anyone"),
        "tricky": ("oh great, {neg}", "just wonderful, {neg}", "I just love how {neg_event}",
                   "perfect, if you enjoy {neg_hobby}", "my old {product} was {pos_adj}, this one is {neg_adj}",
                   "the reviews said {aspect} was {pos_adj}, but mine is {neg_adj}", "~thanks a lot, {neg}"),
    },
}
_SENTIMENT_PLAIN = ("{intro}{this}", "{intro}{this} and {this}", "{this}. {this}", "this {product} is {this_adj}",
                    "{intro}{this}, and {this}")


class _Stream(random.Random):
    """A seeded draw stream; `pick` skips the "~" held-out paraphrases unless `heldout` is set."""

    def __init__(self, seed: str, heldout: bool) -> None:
        super().__init__(seed)  # a str seed is stable across runs and platforms
        self.heldout = heldout

    def pick(self, options: Sequence[str]) -> str:
        return self.choice([o.removeprefix("~") for o in options if self.heldout or not o.startswith("~")])


def _fill(template: str, rng: _Stream, fixed: dict[str, str] | None = None) -> str:
    """Fill every `{slot}` from _SLOTS (values may hold slots too); `fixed` slots take one value throughout."""
    while "{" in template:
        template = re.sub(r"\{(\w+)\}", lambda m: (fixed or {}).get(m[1]) or rng.pick(_SLOTS[m[1]]), template)
    return template


def _intent_text(label: str, rng: _Stream) -> str:
    if rng.random() < 0.65:
        template = rng.pick(_INTENTS[label])
        if not template.startswith("^"):
            return _fill(rng.pick(_ANY_PREFIX) + template, rng)
        prefix, suffix = rng.pick(_POLITE_PREFIX), rng.pick(_SUFFIX)
        return _fill(prefix + template[1:] + ("" if "please" in prefix and "please" in suffix else suffix), rng)
    if rng.random() < 0.3:
        return _fill(rng.pick(_ANY_PREFIX) + rng.pick(_SHORT_CORRECTIONS[label]), rng)
    other = _PARTNER[label] if rng.random() < 0.75 else rng.choice([k for k in _INTENTS if k != label])
    this_cmd, other_cmd = (rng.pick([t.replace("^", "") for t in _INTENTS[k] if "^" in t]) for k in (label, other))
    return _fill(rng.pick(_CORRECTIONS).format(this=this_cmd, other=other_cmd), rng)


def _sentiment_text(label: str, rng: _Stream) -> str:
    this, other = ("pos", "neg") if label == "positive" else ("neg", "pos")
    kind = rng.choices(("plain", "contrast", "negated", "fixed", "tricky"), weights=(40, 30, 12, 8, 10))[0]
    if kind == "plain":
        template = rng.pick(_SENTIMENT_PLAIN)
    elif kind == "contrast":
        template = "{intro}" + rng.pick(_CONTRAST)
    elif kind == "negated":
        template = "{intro}" + rng.pick(_NEGATED)
    else:
        template = "{intro}" + rng.pick(_SENTIMENT_FIXED[label]["negated" if kind == "fixed" else "tricky"])
    template = template.replace("{this", "{" + this).replace("{other", "{" + other)  # {this_adj} -> {pos_adj}
    return _fill(template, rng, {"product": rng.pick(_SLOTS["product"])})  # one product per review


_TASKS = {"intent": (tuple(_INTENTS), _intent_text), "sentiment": (("negative", "positive"), _sentiment_text)}


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"([.?] )([a-z])", lambda m: m[1] + m[2].upper(), text)
    return text[:1].upper() + text[1:]


def _generate(name: str, n: int, rng: _Stream, exclude: Collection[str] = ()) -> Dataset:
    if name not in _TASKS:
        raise EdgeloraError(f"unknown builtin task {name!r}; choose from {', '.join(BUILTIN_TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EdgeloraError(f"builtin:{name}: n={n!r} examples requested; ask for a positive integer")
    names, make_text = _TASKS[name]
    seen: set[str] = set(exclude)
    pairs: list[tuple[str, int]] = []
    for i in range(n):  # labels cycle, so every class is present and the classes stay balanced
        label = i % len(names)
        for _ in range(_MAX_RETRIES):
            text = _tidy(make_text(names[label], rng))
            words = text.lower().split()
            grams = [tuple(words[j:j + 4]) for j in range(len(words) - 3)]  # no clause said twice
            if text not in seen and MIN_WORDS <= len(words) <= MAX_WORDS and len(set(grams)) == len(grams):
                break
        else:
            raise EdgeloraError(f"builtin:{name}: ran out of distinct texts after {len(pairs)}; ask for fewer examples")
        seen.add(text)
        pairs.append((text, label))
    rng.shuffle(pairs)
    return Dataset(tuple(t for t, _ in pairs), tuple(y for _, y in pairs), names)


def _stream(name: str, seed: int, split: str) -> _Stream:
    return _Stream(f"edgelora/{name}/{seed}/{split}", heldout=split == "heldout")


def make_task(name: str, n: int, seed: int) -> Dataset:
    """Generate `n` distinct training examples of a builtin synthetic task (see BUILTIN_TASKS), the same for the
    same seed.

    Example: `make_task("intent", 2000, seed=0)`.
    """
    return _generate(name, n, _stream(name, seed, "train"))


def make_splits(name: str, n_train: int, n_eval: int, seed: int) -> tuple[Dataset, Dataset]:
    """Train and held-out sets of a builtin task. The held-out set comes from its own seed stream, adds
    paraphrases the train set never uses, and shares no text with the train set."""
    train = make_task(name, n_train, seed)
    return train, _generate(name, n_eval, _stream(name, seed, "heldout"), exclude=set(train.texts))


def split_dataset(ds: Dataset, eval_fraction: float, seed: int, *, source: str = "dataset") -> tuple[Dataset, Dataset]:
    """Seeded stratified split; every class with 2+ examples lands in both halves, and an eval text that also
    occurs in train (a duplicate in the file) moves to train so the halves never share a text."""
    if not 0.0 < eval_fraction < 1.0:
        raise EdgeloraError(f"eval_fraction={eval_fraction!r} must lie strictly between 0 and 1, e.g. 0.2")
    rng = random.Random(f"edgelora/split/{seed}")
    eval_idx: set[int] = set()
    for c in range(len(ds.label_names)):
        idx = [i for i, y in enumerate(ds.labels) if y == c]
        rng.shuffle(idx)
        if len(idx) >= 2:
            eval_idx.update(idx[: min(len(idx) - 1, max(1, round(len(idx) * eval_fraction)))])
    train_texts = {ds.texts[i] for i in range(len(ds)) if i not in eval_idx}
    eval_idx = {i for i in eval_idx if ds.texts[i] not in train_texts}
    if not eval_idx:
        raise EdgeloraError(f"{source}: {len(ds)} examples are too few to hold out {eval_fraction:.0%}; add examples "
                            "or pass an eval file")
    order = list(range(len(ds)))
    rng.shuffle(order)
    return _subset(ds, [i for i in order if i not in eval_idx]), _subset(ds, [i for i in order if i in eval_idx])


def _subset(ds: Dataset, idx: Sequence[int]) -> Dataset:
    return Dataset(tuple(ds.texts[i] for i in idx), tuple(ds.labels[i] for i in idx), ds.label_names)


# --- loaders ---------------------------------------------------------------------------------------------
def _parse_builtin(source: str) -> tuple[str, int | None]:
    """`builtin:intent` or `builtin:intent:N` -> (task, N or None)."""
    parts = source.split(":")
    if len(parts) not in (2, 3) or parts[1] not in BUILTIN_TASKS:
        raise EdgeloraError(f"{source}: unknown builtin task; write builtin:TASK or builtin:TASK:N with TASK one of "
                            f"{', '.join(BUILTIN_TASKS)}")
    if len(parts) == 3 and not (parts[2].isdigit() and int(parts[2]) > 0):
        raise EdgeloraError(f"{source}: count {parts[2]!r} is not a positive integer; write e.g. builtin:{parts[1]}:2000")
    return parts[1], int(parts[2]) if len(parts) == 3 else None


def _read_rows(path: Path, text_field: str, label_field: str) -> list[tuple[str, Any, str]]:
    """(text, raw label, "path, line N") per example, checked for shape."""
    rows: list[tuple[str, Any, str]] = []
    fields = (text_field, label_field)
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for name in fields:
                if header and name not in header:
                    raise EdgeloraError(f"{path}, line 1: no column {name!r} in the header (columns: "
                                        f"{', '.join(map(str, header))}); rename the column or pass the field name")
            records = ((reader.line_num, row) for row in reader)
        else:
            records = ((i, _json_object(path, i, line)) for i, line in enumerate(f, 1) if line.strip())
        for line, record in records:
            where = f"{path}, line {line}"
            for name in fields:
                if record.get(name) is None:
                    raise EdgeloraError(f"{where}: missing field {name!r}; every example needs {text_field!r} and "
                                        f"{label_field!r} (or pass the field names the file uses)")
            text = record[text_field]
            if not isinstance(text, str):
                raise EdgeloraError(f"{where}: field {text_field!r} is {type(text).__name__}, not text; make it a string")
            if not text.strip():
                raise EdgeloraError(f"{where}: empty text in field {text_field!r}; fill it in or remove the line")
            rows.append((text.strip(), record[label_field], where))
    if not rows:
        raise EdgeloraError(f"{path}: file is empty (no examples); add one example per "
                            f"{'row below a header' if path.suffix.lower() == '.csv' else 'line'}")
    return rows


def _json_object(path: Path, line: int, raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EdgeloraError(f"{path}, line {line}: malformed JSON ({e.msg}, column {e.colno}); write one JSON object "
                            'per line, e.g. {"text": "...", "label": "..."}') from None
    if not isinstance(obj, dict):
        raise EdgeloraError(f"{path}, line {line}: expected a JSON object, got {type(obj).__name__}; write "
                            '{"text": "...", "label": "..."}')
    return obj


def _label_name(raw: Any, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise EdgeloraError(f"{where}: label {raw!r} is a {type(raw).__name__}; use a string or an integer")
    name = str(raw).strip()
    if not name:
        raise EdgeloraError(f"{where}: empty label; give every example a label")
    return name


def _sorted_names(names: Collection[str]) -> tuple[str, ...]:
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))  # "2" before "10"
    return tuple(sorted(names))


def _to_dataset(source: str, pairs: Sequence[tuple[str, str, str]], label_names: Sequence[str] | None) -> Dataset:
    """Map (text, label name, where) triples onto label indices, checking names against `label_names`."""
    if label_names is None:
        names = _sorted_names({n for _, n, _ in pairs})
        if len(names) < 2:
            raise EdgeloraError(f"{source}: only one class ({names[0]!r}) found; a classifier needs examples "
                                "of at least 2 labels")
    else:
        names = tuple(str(n) for n in label_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise EdgeloraError(f"{source}: label_names {list(names)} must be at least 2 distinct names")
    index = {n: i for i, n in enumerate(names)}
    for _, n, where in pairs:
        if n not in index:
            raise EdgeloraError(f"{where}: label {n!r} is not one of the training labels ({', '.join(names)}); "
                                "fix the label or add examples of it to the training data")
    return Dataset(tuple(t for t, _, _ in pairs), tuple(index[n] for _, n, _ in pairs), names)


def load_dataset(source: str | Path, *, text_field: str = "text", label_field: str = "label",
                 label_names: Sequence[str] | None = None, seed: int = 0) -> Dataset:
    """Load a `.jsonl` file (one object per line), a `.csv` file (header row) or `builtin:TASK[:N]`.

    Labels may be strings or integers (an integer reads as its decimal name, so 1 in JSONL and "1" in CSV are
    one class). Names sort alphabetically, or numerically when all are integers; pass the train split's
    `label_names` to load an eval split against them, which rejects unseen labels. `builtin:TASK:N` generates
    N examples (default DEFAULT_BUILTIN_SIZE) of a synthetic task with `seed`.

    Example: `load_dataset("reviews.csv", text_field="review", label_field="stars")`.
    """
    if isinstance(source, str) and source.startswith("builtin:"):
        name, n = _parse_builtin(source)
        ds = make_task(name, n or DEFAULT_BUILTIN_SIZE, seed)
        return ds if label_names is None else _to_dataset(source, _named(ds, source), label_names)
    path = Path(source)
    if not path.exists():
        raise EdgeloraError(f"{path}: no such file; check the path (or use builtin:{'/builtin:'.join(BUILTIN_TASKS)})")
    if path.is_dir():
        raise EdgeloraError(f"{path}: is a directory; pass a .jsonl or .csv file")
    if path.suffix.lower() not in _EXTENSIONS:
        raise EdgeloraError(f"{path}: unknown extension {path.suffix or '(none)'!r}; use .jsonl (one JSON object per "
                            "line) or .csv (with a header row)")
    try:
        rows = _read_rows(path, text_field, label_field)
    except UnicodeDecodeError as e:
        raise EdgeloraError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except csv.Error as e:
        raise EdgeloraError(f"{path}: malformed CSV ({e}); check the quoting") from None
    except OSError as e:
        raise EdgeloraError(f"{path}: cannot read the file ({e.strerror}); check its permissions") from None
    return _to_dataset(str(path), [(t, _label_name(y, w), w) for t, y, w in rows], label_names)


def _named(ds: Dataset, source: str) -> list[tuple[str, str, str]]:
    return [(t, ds.label_names[y], f"{source}, example {i + 1}") for i, (t, y) in enumerate(zip(ds.texts, ds.labels))]


def load_splits(train: str | Path, eval: str | Path | None = None, seed: int = 0, eval_fraction: float = 0.2, *,
                text_field: str = "text", label_field: str = "label") -> tuple[Dataset, Dataset]:
    """Train and eval datasets, with the eval labels checked against the train labels.

    `builtin:TASK:N` with no eval source generates N examples in all, `eval_fraction` of them held out from a
    separate seed stream; a file with no eval source gets a seeded stratified split; an eval source that is a
    builtin generates held-out texts absent from the train set.

    Example: `train_ds, eval_ds = load_splits("builtin:intent:2500", seed=0)`.
    """
    fields = {"text_field": text_field, "label_field": label_field}
    if not 0.0 < eval_fraction < 1.0:
        raise EdgeloraError(f"eval_fraction={eval_fraction!r} must lie strictly between 0 and 1, e.g. 0.2")
    if isinstance(train, str) and train.startswith("builtin:") and eval is None:
        name, n = _parse_builtin(train)
        total = n or DEFAULT_BUILTIN_SIZE
        n_eval = max(1, round(total * eval_fraction))
        if total - n_eval < 1:
            raise EdgeloraError(f"{train}: {total} examples leave none to train on; ask for more")
        return make_splits(name, total - n_eval, n_eval, seed)
    train_ds = load_dataset(train, seed=seed, **fields)
    if eval is None:
        return split_dataset(train_ds, eval_fraction, seed, source=str(train))
    if isinstance(eval, str) and eval.startswith("builtin:"):
        name, n = _parse_builtin(eval)
        heldout = _generate(name, n or round(DEFAULT_BUILTIN_SIZE * eval_fraction), _stream(name, seed, "heldout"),
                            exclude=set(train_ds.texts))
        return train_ds, _to_dataset(eval, _named(heldout, eval), train_ds.label_names)
    return train_ds, load_dataset(eval, label_names=train_ds.label_names, **fields)


def save_dataset(ds: Dataset, path: str | Path) -> None:
    """Write `ds` as `.jsonl` or `.csv` with string labels (via a temporary file, so a failure keeps the old file)."""
    path = Path(path)
    if path.suffix.lower() not in _EXTENSIONS:
        raise EdgeloraError(f"{path}: unknown extension {path.suffix or '(none)'!r}; save as .jsonl or .csv")
    if not path.parent.is_dir():
        raise EdgeloraError(f"{path}: folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".csv":
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows((t, ds.label_names[y]) for t, y in zip(ds.texts, ds.labels))
            else:
                f.writelines(json.dumps({"text": t, "label": ds.label_names[y]}) + "\n"
                             for t, y in zip(ds.texts, ds.labels))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
