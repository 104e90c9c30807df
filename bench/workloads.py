"""Workloads for bench/quality.py: five datasets none of our defaults were tuned on, written deterministically.

Each is a different shape of work, so a training lever that only suits one of them shows up:
  mixed      three word tasks of different lengths in one dataset (reverse / uppercase / count): mixed lengths
  long       a 15-22 line roster (~330 tokens) and one lookup question: long prompts, short answers
  multiturn  a shopping list edited over 3 user turns: every assistant turn trained
  text       plain text (no chat template), loss on every token: a made-up bestiary with a fixed grammar
  short      spell a word with dashes: ~45-token rows (not in the default grid: text rows are short too)
The numbers of steps and rows per step (20 to 200 steps) are part of the workload: `SPECS`.
"""
from __future__ import annotations

import json
import os
import random

WORDS = ("apple river stone cloud tiger lamp garden window silver forest candle mirror basket rocket pencil "
         "orange violin harbor planet meadow bridge castle dragon feather giant honey island jacket kettle lemon "
         "marble needle ocean pepper quilt rabbit saddle tunnel umbrella valley wagon yellow zebra anchor blanket "
         "copper desert engine falcon glacier hammer iron jungle kitten ladder magnet napkin oyster parrot").split()
CITIES = ("Lisbon Oslo Quito Hanoi Lagos Lima Perth Riga Tunis Dakar Bern Sofia Cork Turku Graz Split Bursa "
          "Malmo Porto Gdansk").split()
NAMES = ("Ada Ben Cleo Dev Eli Fay Gus Hal Ida Jon Kai Lea Max Nia Oto Pia Rex Sol Tia Uma Vic Wes Yan Zoe "
         "Abe Bea Cal Dot Eva Fox Gil Hye Ivo Jin Kit Liv Mo Ned Ola Pim Quin Ria Sam Ty Ula Val Wu Xia Yul Zed").split()
ANIMALS, COLORS, FOODS = ("owl fox newt crab moth eel yak lynx".split(), "red blue green amber grey violet".split(),
                          "berries moss beetles seeds fish roots honey clover".split())
PLACES = "the marsh|the high cliffs|the salt flats|the pine woods|the river delta|the old caves".split("|")
SPECS = {  # name: (optimizer steps, rows per step, MAX_SEQ_LENGTH); 6-10k trained-on tokens each (2-core budget)
    "mixed": (40, 4, 256), "long": (20, 1, 512), "multiturn": (30, 2, 512), "text": (200, 1, 256),
    "short": (100, 2, 256),
}
GRID = ("mixed", "long", "multiturn", "text")  # the default grid; "short" on request
N_TRAIN, N_VALIDATION = 800, 200


def _mixed(r: random.Random) -> dict:
    words = r.sample(WORDS, r.randint(3, 12))
    task = r.choice(("reverse", "upper", "count"))
    if task == "reverse":
        q, a = f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))
    elif task == "upper":
        q, a = f"Write these words in capital letters, comma-separated: {' '.join(words)}", ", ".join(w.upper() for w in words)
    else:
        q, a = f"How many words are there in: {' '.join(words)}? Answer with a number.", str(len(words))
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _long(r: random.Random) -> dict:
    people = r.sample(NAMES, r.randint(15, 22))
    roster = [(p, r.choice(CITIES), r.randint(18, 90)) for p in people]
    who = r.choice(roster)
    lines = "\n".join(f"- {p} lives in {c} and is {a} years old." for p, c, a in roster)
    q = f"Here is a roster:\n{lines}\n\nWhere does {who[0]} live, and how old is {who[0]}?"
    return {"messages": [{"role": "user", "content": q},
                         {"role": "assistant", "content": f"{who[0]} lives in {who[1]} and is {who[2]}."}]}


def _multiturn(r: random.Random) -> dict:
    items = r.sample(WORDS, 3)
    msgs = [{"role": "user", "content": f"Start a shopping list with: {', '.join(items)}."},
            {"role": "assistant", "content": f"List: {', '.join(items)}."}]
    for _ in range(2):
        if len(items) > 1 and r.random() < 0.4:
            gone = r.choice(items)
            items = [x for x in items if x != gone]
            ask = f"Remove {gone}."
        else:
            new = r.choice([w for w in WORDS if w not in items])
            items = items + [new]
            ask = f"Add {new}."
        msgs += [{"role": "user", "content": ask}, {"role": "assistant", "content": f"List: {', '.join(items)}."}]
    return {"messages": msgs}


def _text(r: random.Random) -> dict:
    name = r.choice(NAMES) + r.choice(("ling", "wick", "mar", "dor", "by"))
    hours = r.randint(2, 14)
    return {"text": f"The {name} is a {r.choice(COLORS)} {r.choice(ANIMALS)} from {r.choice(PLACES)}. "
                    f"It eats {r.choice(FOODS)} and sleeps {hours} hours a day, {'more' if hours > 8 else 'less'} "
                    f"than most."}


def _short(r: random.Random) -> dict:
    w = r.choice(WORDS)
    return {"messages": [{"role": "user", "content": f"Spell {w}"}, {"role": "assistant", "content": "-".join(w)}]}


MAKERS = {"mixed": _mixed, "long": _long, "multiturn": _multiturn, "text": _text, "short": _short}


def write(name: str, root: str) -> str:
    """Write <root>/<name>/train.jsonl + validation.jsonl (seeded by the name) and return the folder."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    r = random.Random(f"quality-{name}")
    for split, n in (("train", N_TRAIN), ("validation", N_VALIDATION)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as fh:
            for _ in range(n):
                fh.write(json.dumps(MAKERS[name](r)) + "\n")
    return folder
