"""The shipped sample datasets: extract a person's name, city and age from a sentence into strict JSON.
data/sample (SFT conversations), data/sample_dpo (preference pairs: the correct JSON vs a realistic mistake)
and data/sample_grpo (prompts with the checkable answer) are all written from here.

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

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_DIR = os.path.join(DATA_DIR, "sample")
DPO_DIR, GRPO_DIR = os.path.join(DATA_DIR, "sample_dpo"), os.path.join(DATA_DIR, "sample_grpo")
N_TRAIN = 1000
N_VALIDATION = 200
N_DPO_TRAIN, N_DPO_VALIDATION = 320, 64
N_GRPO_TRAIN, N_GRPO_VALIDATION = 256, 64
# The mistakes a model makes on this task before it has learned it (seen in SmolLM2-135M's answers).
MISTAKES = ("age as a string", "extra prose after the JSON", "a missing key", "a wrong city")

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


def _fields(rng: random.Random) -> tuple[str, str, str, int]:
    """(sentence, name, city, age), drawing every field each time as `generate` does."""
    template = rng.choice(TEMPLATES)
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    city = rng.choice(CITIES)
    age = rng.randint(18, 90)
    job, hobby = rng.choice(JOBS), rng.choice(HOBBIES)
    return template.format(name=name, city=city, age=age, job=job, hobby=hobby), name, city, age


def _distinct(n: int, seed: int, avoid: set[str]) -> list[tuple[str, str, str, int]]:
    rng, out, seen = random.Random(seed), [], set(avoid)
    while len(out) < n:
        item = _fields(rng)
        if item[0] not in seen:
            seen.add(item[0])
            out.append(item)
    return out


def _mistake(kind: str, name: str, city: str, age: int, rng: random.Random) -> str:
    if kind == "age as a string":
        return json.dumps({"name": name, "city": city, "age": str(age)}, separators=(", ", ": "))
    if kind == "extra prose after the JSON":
        return _answer(name, city, age) + rng.choice([
            f"\n\n{name} is {age} years old and lives in {city}.", "\n\nLet me know if you need anything else!",
            f"\n\nNote: the age is {age}."])
    if kind == "a missing key":
        drop = rng.choice(["city", "age"])
        full = {"name": name, "city": city, "age": age}
        return json.dumps({k: v for k, v in full.items() if k != drop}, separators=(", ", ": "))
    other = rng.choice([c for c in CITIES if c != city])
    return _answer(name, other, age)


def _prompt(sentence: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": sentence}]


def generate_dpo(n_rows: int, seed: int = 1) -> list[dict]:
    """Preference pairs in TRL's conversational form: chosen = the correct JSON, rejected = one mistake,
    the four kinds in turn. Sentences never appear in the SFT sample."""
    avoid = {r["messages"][1]["content"] for r in generate(N_TRAIN + N_VALIDATION, seed=0)}
    rng = random.Random(seed + 1000)
    rows = []
    for i, (sentence, name, city, age) in enumerate(_distinct(n_rows, seed, avoid)):
        rows.append({"prompt": _prompt(sentence),
                     "chosen": [{"role": "assistant", "content": _answer(name, city, age)}],
                     "rejected": [{"role": "assistant", "content": _mistake(MISTAKES[i % 4], name, city, age, rng)}]})
    return rows


def generate_grpo(n_rows: int, seed: int = 2) -> list[dict]:
    """GRPO prompts with the answer a reward can check (`answer` column)."""
    avoid = {r["messages"][1]["content"] for r in generate(N_TRAIN + N_VALIDATION, seed=0)}
    return [{"prompt": _prompt(sentence), "answer": _answer(name, city, age)}
            for sentence, name, city, age in _distinct(n_rows, seed, avoid)]


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


def write_split(directory: str, rows: list[dict], n_train: int) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, "train.jsonl"), os.path.join(directory, "validation.jsonl")]
    _write_jsonl(paths[0], rows[:n_train])
    _write_jsonl(paths[1], rows[n_train:])
    return paths


def write_all() -> list[str]:
    return (write() + write_split(DPO_DIR, generate_dpo(N_DPO_TRAIN + N_DPO_VALIDATION), N_DPO_TRAIN)
            + write_split(GRPO_DIR, generate_grpo(N_GRPO_TRAIN + N_GRPO_VALIDATION), N_GRPO_TRAIN))


if __name__ == "__main__":
    for p in write_all():
        print(p)
