"""The shipped sample dataset: extract a person's name, city and age from a sentence into strict JSON.

Chosen because a base model does not answer in this exact format, a fine-tuned one does, and every
answer can be graded automatically (finetune.evaluate.score). Output is byte-identical on every run: the only
randomness is random.Random(seed), and all lists below are fixed and ordered.

Regenerate the committed files with:  python -m finetune.sample_data
"""
from __future__ import annotations

import json
import os
import random

SYSTEM_PROMPT = ('Extract the person\'s name, city and age from the text. Reply with only a JSON object '
                 'with keys "name", "city", "age".')

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")
N_TRAIN = 1000
N_VALIDATION = 200

FIRST_NAMES = [
    "Alice", "Bruno", "Chen", "Dmitri", "Elena", "Farah", "Gustavo", "Hana", "Ibrahim", "Julia",
    "Kenji", "Laura", "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samuel", "Tara",
    "Umar", "Valentina", "Wei", "Ximena", "Yusuf", "Zara", "Aaron", "Beatriz", "Carlos", "Daniela",
    "Emil", "Fatima", "George", "Helga", "Isaac", "Jana", "Kofi", "Leila", "Marcus", "Nora",
    "Olga", "Pedro", "Rahul", "Sofia", "Thomas", "Ursula", "Victor", "Wanda", "Yara", "Zoltan",
    "Amara", "Ben", "Clara", "David", "Erik", "Grace", "Hugo", "Ingrid", "Jamal", "Keiko",
    "Lucas", "Maya", "Nikolai", "Paula",
]
LAST_NAMES = [
    "Smith", "Garcia", "Nguyen", "Kowalski", "Okafor", "Rossi", "Tanaka", "Muller", "Silva", "Haddad",
    "Johnson", "Petrov", "Kim", "Novak", "Mensah", "Larsen", "Dubois", "Costa", "Singh", "Ferreira",
    "Brown", "Yilmaz", "Ivanova", "Moreau", "Santos", "Fischer", "Ali", "Hansen", "Lopez", "Wright",
    "Sato", "Jensen", "Romero", "Schmidt", "Cohen", "Adeyemi", "Park", "Bianchi", "Walsh", "Reyes",
]
CITIES = [
    "London", "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Warsaw", "Dublin",
    "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Athens", "Istanbul", "Cairo",
    "Lagos", "Nairobi", "Accra", "Cape Town", "Casablanca", "Dubai", "Mumbai", "Delhi", "Bangalore", "Karachi",
    "Dhaka", "Bangkok", "Hanoi", "Singapore", "Jakarta", "Manila", "Seoul", "Tokyo", "Osaka", "Beijing",
    "Shanghai", "Sydney", "Melbourne", "Auckland", "Toronto", "Vancouver", "Montreal", "New York", "Chicago",
    "San Francisco", "Los Angeles", "Mexico City", "Bogota", "Lima", "Santiago", "Buenos Aires", "Sao Paulo",
    "Rio de Janeiro", "Denver", "Seattle",
]
JOBS = [
    "nurse", "teacher", "software engineer", "baker", "pilot", "lawyer", "carpenter", "journalist",
    "architect", "chef", "farmer", "dentist", "librarian", "mechanic", "photographer", "accountant",
    "electrician", "musician", "pharmacist", "translator",
]
HOBBIES = [
    "chess", "gardening", "running", "painting", "cooking", "hiking", "photography", "knitting",
    "cycling", "swimming", "birdwatching", "pottery", "reading", "surfing", "baking", "climbing",
]

# Orders of name/city/age vary so the model must find each field, not copy by position.
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, a {job} from {city}, just turned {age}.",
    "Meet {name}: {age} years old, based in {city}, and a big fan of {hobby}.",
    "At {age}, {name} is the oldest {job} in {city}.",
    "In {city}, {age}-year-old {name} spends weekends on {hobby}.",
    "{city} is home to {name}, who is {age}.",
    "Our new {job}, {name} ({age}), commutes every day in {city}.",
    "{name} ({age}) from {city} has been into {hobby} for years.",
    "Born {age} years ago, {name} now lives in {city}.",
    "The {job} {name}, age {age}, grew up in {city}.",
    "A {age}-year-old {job} named {name} lives in {city}.",
    "{name} lives in {city}. They are {age}.",
    "{name}, {age}, has lived in {city} since childhood.",
    "Having lived in {city} for a while, {name} celebrated turning {age} with friends from the {hobby} club.",
    "Name: {name}. Age: {age}. Hometown: {city}.",
    "{name} teaches {hobby} classes in {city} and is {age} years old.",
    "Ask any {job} in {city} about {name}; at {age}, still the best at {hobby}.",
    "Everyone in {city} knows {name}, the {age}-year-old {job}.",
    "According to the form, {name} is aged {age} and resides in {city}.",
    "{age} years old and working as a {job}, {name} calls {city} home.",
]


def _answer(name: str, city: str, age: int) -> str:
    # One fixed compact style (keys in this order) so the model learns a single exact target string.
    return json.dumps({"name": name, "city": city, "age": age}, separators=(", ", ": "))


def generate(n_rows: int = 1200, seed: int = 0) -> list[dict]:
    """n_rows chat rows with distinct user sentences, deterministic for a given seed."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n_rows:
        # Draw every field on every iteration (even when unused) so the stream of draws stays simple.
        template = rng.choice(TEMPLATES)
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        city = rng.choice(CITIES)
        age = rng.randint(18, 90)
        job, hobby = rng.choice(JOBS), rng.choice(HOBBIES)
        sentence = template.format(name=name, city=city, age=age, job=job, hobby=hobby)
        if sentence in seen:  # distinct sentences keep train/validation splits disjoint
            continue
        seen.add(sentence)
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": _answer(name, city, age)},
        ]})
    return rows


def _write_jsonl(path: str, rows: list[dict]) -> None:
    # newline="\n" and ensure_ascii keep the bytes identical across platforms.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def write(directory: str = DEFAULT_DIR) -> list[str]:
    """Write train.jsonl (1000 rows) and validation.jsonl (200 rows); return their paths."""
    os.makedirs(directory, exist_ok=True)
    rows = generate(N_TRAIN + N_VALIDATION, seed=0)
    paths = [os.path.join(directory, "train.jsonl"), os.path.join(directory, "validation.jsonl")]
    _write_jsonl(paths[0], rows[:N_TRAIN])
    _write_jsonl(paths[1], rows[N_TRAIN:])
    return paths


if __name__ == "__main__":
    for p in write():
        print(p)
