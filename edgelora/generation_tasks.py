"""Seeded synthetic generation tasks for causal-LM adapters, and their scores.

`home-json`: a smart-home command to a JSON action object,
    "dim the kitchen lights to 30 percent" -> {"device": "light", "room": "kitchen", "action": "set", "value": 30}
`meeting`: an informal meeting request rewritten into one fixed formal sentence,
    "can we catch up thu around 2pm w/ Priya re the roadmap?" -> "Meeting with Priya on Thursday at 14:00 about
    the roadmap."
Both are scored by exact match and by per-field accuracy. Commands carry paraphrases, polite wrappers and
corrections ("..., no wait, the bedroom"); the held-out stream (its own seed) also draws phrasings and values
the training stream never uses (marked "~" below), so the held-out score measures generalisation, not recall.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

from edgelora.data import parse_builtin_source
from edgelora.errors import EdgeloraError

GENERATION_TASKS = ("home-json", "meeting")
DEFAULT_SIZE = 2000
HOME_FIELDS = ("device", "room", "action", "value")
MEETING_FIELDS = ("person", "day", "time", "topic")
HOME_INSTRUCTION = "Smart-home command to JSON: "
MEETING_INSTRUCTION = "Rewrite as a formal meeting note: "
_MAX_DRAWS = 200  # draws per example before a task is declared too small for the requested n


class _Draw(random.Random):
    """A seeded stream; `pick` leaves out the "~" held-out options unless drawing the held-out split."""

    def __init__(self, task: str, seed: int, split: str) -> None:
        super().__init__(f"edgelora/generation/{task}/{seed}/{split}")
        self.heldout = split == "eval"

    def pick(self, options: Sequence[Any]) -> Any:
        usable = [o for o in options if self.heldout or not (isinstance(o, str) and o.startswith("~"))]
        choice = self.choice(usable)
        return choice.removeprefix("~") if isinstance(choice, str) else choice


# --- home-json ------------------------------------------------------------------------------------------------
_ROOMS = ("kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "garage", "basement", "study",
          "dining room", "nursery", "attic", "~porch", "~guest room")
_POLITE = ("", "", "", "please ", "could you ", "can you ", "hey, ", "would you ", "~kindly ", "~go ahead and ")
# (device, action, takes a value, phrasings); {room} and {value} are filled in.
_HOME: tuple[tuple[str, str, bool, tuple[str, ...]], ...] = (
    ("light", "on", False, ("turn on the {room} lights", "switch on the lights in the {room}", "lights on in the {room}",
                            "put the {room} lamp on", "~light up the {room}")),
    ("light", "off", False, ("turn off the {room} lights", "switch the {room} lights off", "kill the lights in the {room}",
                             "lights off in the {room}", "~shut the {room} lamp off")),
    ("light", "set", True, ("dim the {room} lights to {value} percent", "set the {room} lights to {value}%",
                            "make the {room} lights {value} percent bright", "brightness in the {room} to {value} percent",
                            "~bring the {room} lamp down to {value} percent")),
    ("thermostat", "set", True, ("set the {room} thermostat to {value} degrees", "make it {value} degrees in the {room}",
                                 "heat the {room} to {value} degrees", "{room} temperature to {value}",
                                 "~warm the {room} up to {value} degrees")),
    ("blinds", "open", False, ("open the {room} blinds", "raise the blinds in the {room}", "~pull up the {room} blinds")),
    ("blinds", "close", False, ("close the {room} blinds", "shut the blinds in the {room}", "~draw the {room} blinds")),
    ("blinds", "set", True, ("lower the {room} blinds to {value} percent", "set the {room} blinds to {value}%",
                             "~move the blinds in the {room} to {value} percent")),
    ("lock", "lock", False, ("lock the {room} door", "lock up the {room}", "~secure the {room} door")),
    ("lock", "unlock", False, ("unlock the {room} door", "open the lock on the {room} door", "~let me into the {room}")),
    ("speaker", "set", True, ("set the {room} speaker volume to {value}", "turn the {room} music to volume {value}",
                              "speaker in the {room} at {value} percent", "~{room} speaker loudness {value}")),
    ("speaker", "off", False, ("stop the music in the {room}", "turn off the {room} speaker", "~silence the {room} speaker")),
)
_VALUES = {"light": (*range(5, 100, 5), "~33", "~67"), "blinds": (*range(10, 100, 10), "~25", "~75"),
           "speaker": (*range(5, 100, 5), "~42"), "thermostat": (*range(16, 27), "~27", "~15")}
_ROOM_FIXES = ("{first}, no wait, the {room}", "{first}, sorry, I meant the {room}", "{first}... actually the {room}",
               "~{first}, scratch that, the {room}")
_VALUE_FIXES = ("{first}, no, make it {value}", "{first}, actually {value}", "~{first}, on second thought {value}")


def _home_example(rng: _Draw) -> tuple[str, dict[str, Any]]:
    device, action, valued, phrasings = rng.choice(_HOME)
    room = rng.pick(_ROOMS)
    value = int(rng.pick(_VALUES[device])) if valued else None
    phrase = rng.pick(phrasings)
    kind = rng.random()
    if kind < 0.15:  # a correction of the room: the last room named wins
        first = phrase.format(room=rng.pick([r for r in _ROOMS if r.lstrip("~") != room]), value=value)
        text = rng.pick(_ROOM_FIXES).format(first=first, room=room)
    elif kind < 0.25 and valued:  # a correction of the value
        other = int(rng.pick([v for v in _VALUES[device] if str(v).lstrip("~") != str(value)]))
        text = rng.pick(_VALUE_FIXES).format(first=phrase.format(room=room, value=other), value=value)
    else:
        text = phrase.format(room=room, value=value)
    return rng.pick(_POLITE) + text, {"device": device, "room": room, "action": action, "value": value}


# --- meeting --------------------------------------------------------------------------------------------------
_PEOPLE = ("Priya", "Tom", "Anna", "Kenji", "Fatima", "Lucas", "Mei", "Omar", "Sofia", "Diego", "Hannah", "Ivan",
           "~Zoe", "~Rahul")
_DAYS = {"Monday": ("monday", "mon", "Monday"), "Tuesday": ("tuesday", "tue", "Tues"),
         "Wednesday": ("wednesday", "wed", "Wed"), "Thursday": ("thursday", "thu", "~thurs"),
         "Friday": ("friday", "fri", "Friday"), "Saturday": ("saturday", "sat")}
_DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "~Saturday")
_TOPICS = ("the roadmap", "the budget", "the launch", "hiring", "the Q3 report", "the design review", "onboarding",
           "the migration", "the contract", "~the offsite", "~pricing")
_HOURS = (8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
_MINUTES = (0, 0, 0, 30, 15, "~45")
_MEETING = ("can we meet {day} at {time} w/ {person} re {topic}?", "{person} and I need to sync on {topic}, {day} {time}",
            "let's grab {person} {day} around {time} to talk {topic}", "quick chat with {person} about {topic} {day} at {time}?",
            "{day} {time} works for a call with {person} on {topic}", "pls set up {topic} w/ {person}, {day} @ {time}",
            "~{person} wants to go over {topic}, how about {day} {time}", "~ping {person}: {topic}, {day}, {time}")


def _spoken_time(hour: int, minute: int, rng: _Draw) -> str:
    twelve = hour % 12 or 12
    suffix = rng.pick(("pm", " pm", "PM")) if hour >= 12 else rng.pick(("am", " am", "AM"))
    if minute == 0:
        options = [f"{twelve}{suffix}", f"{hour}:00"]
        if hour != 12:
            options.append(f"{twelve} o'clock in the {'afternoon' if hour > 12 else 'morning'}")
        return rng.pick(options)
    return rng.pick((f"{twelve}:{minute:02d}{suffix}", f"{hour}:{minute:02d}"))


def _meeting_example(rng: _Draw) -> tuple[str, dict[str, Any]]:
    person, topic = rng.pick(_PEOPLE), rng.pick(_TOPICS)
    day = rng.pick(_DAY_NAMES)
    spoken_day = rng.pick(_DAYS[day])
    hour, minute = rng.pick(_HOURS), int(rng.pick(_MINUTES))
    text = rng.pick(_MEETING).format(day=spoken_day, time=_spoken_time(hour, minute, rng), person=person, topic=topic)
    return text, {"person": person, "day": day, "time": f"{hour:02d}:{minute:02d}", "topic": topic}


def meeting_note(fields: dict[str, Any]) -> str:
    """The formal sentence of a meeting (the `meeting` task's answer)."""
    return f"Meeting with {fields['person']} on {fields['day']} at {fields['time']} about {fields['topic']}."


_NOTE = re.compile(r"Meeting with (?P<person>.+?) on (?P<day>\w+) at (?P<time>\d\d:\d\d) about (?P<topic>.+)\.")


def parse_meeting_note(text: str) -> dict[str, str] | None:
    """The fields of a generated note, None when it does not have the note's form."""
    match = _NOTE.fullmatch(text.strip())
    return match.groupdict() if match else None


def home_json(fields: dict[str, Any]) -> str:
    """The JSON action object as the `home-json` task writes it: its four fields, in order."""
    return json.dumps({k: fields[k] for k in HOME_FIELDS})


def parse_home_json(text: str) -> dict[str, Any] | None:
    """The JSON object a model generated (surrounding whitespace allowed), None when it is not one."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# --- the tasks ------------------------------------------------------------------------------------------------
_TASKS = {
    "home-json": (HOME_INSTRUCTION, _home_example, home_json, parse_home_json, HOME_FIELDS),
    "meeting": (MEETING_INSTRUCTION, _meeting_example, meeting_note, parse_meeting_note, MEETING_FIELDS),
}


def _check_task(name: str) -> None:
    if name not in _TASKS:
        raise EdgeloraError(f"unknown builtin generation task {name!r}; choose from {', '.join(GENERATION_TASKS)}")


def make_pairs(name: str, n: int, seed: int, split: str = "train", exclude: set[str] | frozenset[str] = frozenset()
               ) -> list[tuple[str, str]]:
    """`n` distinct (prompt, completion) pairs of task `name`, the same for the same seed and split.

    `split` "train" draws the training phrasings; "eval" draws from its own stream, which adds held-out
    phrasings and values; prompts in `exclude` (a train set's) are never drawn.
    """
    _check_task(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EdgeloraError(f"builtin:{name}: n={n!r} examples requested; ask for a positive integer")
    if split not in ("train", "eval"):
        raise EdgeloraError(f"split={split!r} must be 'train' or 'eval'")
    instruction, example, answer, _, _ = _TASKS[name]
    rng = _Draw(name, seed, split)
    seen, pairs = set(exclude), []
    for _ in range(n):
        for _ in range(_MAX_DRAWS):
            text, fields = example(rng)
            prompt = instruction + re.sub(r"\s+", " ", text).strip()
            if prompt not in seen:
                break
        else:
            raise EdgeloraError(f"builtin:{name}: ran out of distinct prompts after {len(pairs)}; ask for fewer examples")
        seen.add(prompt)
        pairs.append((prompt, answer(fields)))
    return pairs


def parse_builtin(source: str) -> tuple[str, int]:
    """`builtin:home-json` or `builtin:home-json:N` -> (task, N); N defaults to DEFAULT_SIZE."""
    name, n = parse_builtin_source(source, GENERATION_TASKS, "generation ")
    return name, DEFAULT_SIZE if n is None else n


# --- scores ---------------------------------------------------------------------------------------------------
def score(name: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match and per-field accuracy of generated answers against the references of task `name`.

    An answer matches exactly when it parses to the reference's fields (JSON whitespace aside) — for
    `meeting`, when it is the reference sentence. A field counts as right when the parsed answer holds the
    reference's value; an unparsable answer has every field wrong.
    """
    _check_task(name)
    if len(predictions) != len(references):
        raise EdgeloraError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    *_, parse, fields = _TASKS[name]
    exact, right, parsed_ok = 0, dict.fromkeys(fields, 0), 0
    for prediction, reference in zip(predictions, references):
        got, want = parse(prediction), parse(reference)
        if want is None:
            raise EdgeloraError(f"reference {reference!r} is not a {name} answer")
        if got is None:
            continue
        parsed_ok += 1
        exact += int(got == want)
        for key in fields:
            right[key] += int(key in got and got[key] == want[key])
    n = max(1, len(references))
    per_field = {f"field_{k}": right[k] / n for k in fields}
    return {"exact_match": exact / n, "field_accuracy": sum(right.values()) / (n * len(fields)),
            "parsable": parsed_ok / n, **per_field}


def task_of(source: str) -> str | None:
    """The builtin task a data source names (`builtin:home-json:500` -> "home-json"), None for a file."""
    if isinstance(source, str) and source.startswith("builtin:"):
        return parse_builtin(source)[0]
    return None
