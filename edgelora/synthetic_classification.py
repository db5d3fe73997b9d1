"""Seeded synthetic text-classification tasks (`intent`, `sentiment`): templates and their generator.

No labelled text ships offline here, so the builtin tasks that `edgelora.data` serves as `builtin:TASK[:N]`
are generated from seeded templates; negation, corrections and contrast make a bag of keywords fall short of
solving them. Standard library only (the runtime's bench reads builtin tasks without torch).
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence

from edgelora.errors import EdgeloraError

TASKS = ("intent", "sentiment")
MIN_WORDS, MAX_WORDS = 4, 25  # every generated text has this many words
_MAX_RETRIES = 200  # draws per example before a task is declared too small for the requested n

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


def generate(name: str, n: int, seed: int, split: str = "train",
             exclude: Collection[str] = ()) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """`n` distinct examples of task `name` as (texts, labels, label names), the same for the same seed and split.

    Args:
        split: "train", or "heldout": a seed stream of its own that also draws the "~" paraphrases, so
            held-out accuracy measures generalisation to wording the train split never uses.
        exclude: texts never to produce (the train split's, when generating its held-out set).

    Example: `texts, labels, names = generate("intent", 2000, seed=0)`.
    """
    if name not in _TASKS:
        raise EdgeloraError(f"unknown builtin task {name!r}; choose from {', '.join(TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EdgeloraError(f"builtin:{name}: n={n!r} examples requested; ask for a positive integer")
    names, make_text = _TASKS[name]
    rng = _Stream(f"edgelora/{name}/{seed}/{split}", heldout=split == "heldout")
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
    return tuple(t for t, _ in pairs), tuple(y for _, y in pairs), names
