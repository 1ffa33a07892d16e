"""The demo's labelled corpus: the planted concepts' words and the template sentences that hold them.

The shipped file (``jsnmf/data/demo_corpus.jsonl``) is a few hundred template sentences, each labelled
with the concept(s) whose words it holds (``"filler"`` for none); ``compose_corpus`` regenerates it.
"""

from __future__ import annotations

import itertools
import json
import random
from importlib import resources
from pathlib import Path

CORPUS_FILE = "demo_corpus.jsonl"

# The planted concepts: name -> words (every word a single token of the demo tokenizer).
CONCEPTS: dict[str, tuple[str, ...]] = {
    "weekdays": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "months": ("january", "february", "march", "april", "may", "june", "july", "august",
               "september", "october", "november", "december"),
    "colours": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "grey", "black", "white"),
    "numbers": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "animals": ("dog", "cat", "horse", "rabbit", "fox", "tiger", "lion", "sheep", "goat", "owl", "wolf", "deer"),
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "peach", "plum", "melon", "orange"),
    "body_parts": ("knee", "elbow", "shoulder", "finger", "nose", "ear", "ankle", "wrist", "neck", "thumb"),
    "countries": ("france", "spain", "italy", "germany", "japan", "brazil", "canada", "egypt", "kenya",
                  "norway", "peru", "india"),
    "instruments": ("piano", "violin", "guitar", "drum", "flute", "trumpet", "cello", "harp"),
    "vehicles": ("car", "bus", "train", "bicycle", "truck", "boat", "tram", "ferry", "taxi", "scooter"),
}

def demo_corpus_path() -> Path:
    """Path of the shipped demo corpus (JSONL, fields ``text`` and ``label``)."""
    return Path(str(resources.files("jsnmf") / "data" / CORPUS_FILE))


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "weekdays": (
        "The market opens early on {} morning.", "We will meet again next {} after lunch.",
        "My sister always calls me on {} evening.", "The museum is closed every {}.",
        "Her flight leaves on {} at noon.", "On {} the office was quiet.",
        "The report is due by {} at the latest.", "They played football last {} in the park.",
    ),
    "months": (
        "The garden looks lovely in {}.", "School starts again in {}.",
        "My grandmother was born in {}.", "The lake was frozen in late {}.",
        "We moved into the new house in {}.", "The festival takes place every {}.",
        "Prices went up sharply in {}.", "In {} the town feels busy.",
    ),
    "colours": (
        "She painted the front door {}.", "He wore a {} coat to the party.",
        "The house next to the bakery is {}.", "They chose {} curtains for the kitchen.",
        "My favourite shirt is {}.", "A {} balloon floated over the roof.",
        "The walls of the room are {}.", "The little girl drew a {} house.",
    ),
    "numbers": (
        "We bought {} tickets for the show.", "The recipe needs {} eggs.",
        "There were {} people waiting at the door.", "She has read {} books this year.",
        "The show started {} minutes late.", "He counted {} birds on the fence.",
        "Our team scored {} goals in the final.", "We stayed for {} nights by the sea.",
    ),
    "animals": (
        "A {} was sleeping under the tree.", "The children fed the {} at the farm.",
        "We saw a {} near the river.", "My neighbour has a very old {}.",
        "The {} ran across the field.", "There is a picture of a {} on the wall.",
        "The zoo has a new {} this spring.", "A {} followed us home last night.",
    ),
    "fruits": (
        "She ate a {} for breakfast.", "The shop sells fresh {} juice.",
        "He cut the {} into small pieces.", "There is a {} in my bag.",
        "We made a {} cake for the party.", "The {} on the table is ripe.",
        "My brother does not like {} at all.", "A slice of {} sat on the plate.",
    ),
    "body_parts": (
        "He hurt his {} playing tennis.", "She broke her {} last winter.",
        "My {} is still sore after the walk.", "The doctor looked at his {}.",
        "The ball hit her {} hard.", "He put a bandage on his {}.",
        "She felt a sharp pain in her {}.", "The cold wind made my {} ache.",
    ),
    "countries": (
        "They spent the summer in {}.", "My cousin works in {} now.",
        "This coffee comes from {}.", "We flew to {} last year.",
        "She is reading about the history of {}.", "The team from {} won the match.",
        "He sent a letter to a friend in {}.", "The film was made in {}.",
    ),
    "instruments": (
        "She practises the {} every day.", "He played the {} at the concert.",
        "My uncle sold his old {}.", "The {} sounded beautiful in the hall.",
        "They bought a {} for the school.", "The music teacher tuned the {}.",
        "I learned to play the {} as a child.", "A dusty {} was standing in the corner.",
    ),
    "vehicles": (
        "We took the {} to the city.", "The {} was late again this morning.",
        "He parked the {} near the station.", "The {} broke down on the bridge.",
        "She rides the {} to work.", "The {} stopped at the corner.",
        "They waited for the {} in the rain.", "The old {} was cleaned last spring.",
    ),
}

# Two concepts in one sentence: (template, concept of the first slot, concept of the second slot).
_MIXED_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("On {} we saw a {} near the river.", "weekdays", "animals"),
    ("In {} they travelled to {}.", "months", "countries"),
    ("The {} gate had {} locks.", "colours", "numbers"),
    ("She bought a {} and a {} at the market.", "fruits", "fruits"),
    ("He played the {} until his {} hurt.", "instruments", "body_parts"),
    ("We took the {} to see the {}.", "vehicles", "animals"),
    ("Every {} she eats a {}.", "weekdays", "fruits"),
    ("The {} from {} arrived in {}.", "vehicles", "countries", "months"),
    ("My {} is painted {}.", "vehicles", "colours"),
    ("In {} the farmer bought {} chairs.", "months", "numbers"),
)

_FILLER = (
    "The weather was nice and we walked home slowly.",
    "He opened the window and listened to the street.",
    "Nobody knew where the keys had gone.",
    "She wrote a long letter to her old teacher.",
    "The meeting ended without a clear decision.",
    "We should leave before it gets dark.",
    "The book on the shelf belongs to my friend.",
    "It was a quiet evening in the small village.",
    "They laughed at the joke for a long time.",
    "The new library is bigger than the old one.",
    "I think the answer is hidden in the last chapter.",
    "The kitchen smelled of fresh bread.",
    "He forgot to bring his umbrella again.",
    "The children were playing in the garden.",
    "Our neighbours are moving to another town.",
    "The path through the forest was narrow.",
    "She smiled and closed the door behind her.",
    "The teacher asked a difficult question.",
    "We found an old map in the attic.",
    "The river was calm after the storm.",
    "Please put the cups back in the cupboard.",
    "The phone rang twice and then stopped.",
    "He likes to read the news in the morning.",
    "The shop on the corner sells good bread.",
    "They talked about the film for hours.",
    "It took a while to find the right house.",
    "The lamp in the hall is broken.",
    "She keeps her notes in a small box.",
    "The road to the village was covered in leaves.",
    "We waited at the station for a long time.",
)

_SINGLE_PER_TEMPLATE = 4  # sentences per single-concept template
_MIXED_PER_TEMPLATE = 5


def _word_cycles(rng: random.Random) -> dict[str, itertools.cycle]:
    """Per concept an endless cycle over its words in a shuffled order, so words appear evenly."""
    cycles = {}
    for name, words in CONCEPTS.items():
        order = list(words)
        rng.shuffle(order)
        cycles[name] = itertools.cycle(order)
    return cycles


def compose_corpus(seed: int = 0) -> list[dict]:
    """The demo corpus as records ``{"text", "label"}``; the shipped file is this, written as JSONL."""
    rng = random.Random(seed)
    words = _word_cycles(rng)
    records = []
    for name, templates in _TEMPLATES.items():
        for template in templates:
            for _ in range(_SINGLE_PER_TEMPLATE):
                records.append({"text": _fill(template, [_display(name, next(words[name]))]), "label": name})
    for template, *slots in _MIXED_TEMPLATES:
        for _ in range(_MIXED_PER_TEMPLATE):
            text = _fill(template, [_display(c, next(words[c])) for c in slots])
            records.append({"text": text, "label": "+".join(sorted(set(slots)))})
    records.extend({"text": text, "label": "filler"} for text in _FILLER)
    rng.shuffle(records)
    return records


_PROPER_NOUNS = ("weekdays", "months", "countries")


def _display(concept: str, word: str) -> str:
    """How a concept word is written in a sentence (the tokenizer lower-cases it again)."""
    return word.capitalize() if concept in _PROPER_NOUNS else word


def _fill(template: str, words: list[str]) -> str:
    text = template.format(*words)
    return text[0].upper() + text[1:]


def read_demo_corpus() -> list[dict]:
    """The shipped demo corpus records."""
    with open(demo_corpus_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
