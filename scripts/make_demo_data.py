"""Write the bundled demo data (soup/assets/demo/sft.jsonl and pretrain.jsonl).

The rows are synthetic and follow a few simple patterns (reverse a word, name a
capital, upper-case a word, add small numbers; templated tiny stories), so a tiny
byte-level model's loss visibly falls within ~150 steps. Deterministic: running it
again writes the same bytes.

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "soup" / "assets" / "demo"
MAX_ROW_BYTES = 200

WORDS = [
    "apple", "river", "garden", "silver", "candle", "window", "planet", "forest", "pencil", "rabbit",
    "bridge", "orange", "winter", "summer", "island", "mirror", "rocket", "castle", "button", "dragon",
    "kitten", "meadow", "guitar", "pepper", "butter", "ladder", "pillow", "turtle", "violin", "walnut",
    "tiger", "cloud", "stone", "light", "sugar", "piano", "lemon", "horse", "table", "chair",
    "bread", "ocean", "music", "paper", "glass", "smile", "train", "queen", "honey", "storm",
]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Peru": "Lima", "Russia": "Moscow", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Australia": "Canberra", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Nigeria": "Abuja", "Morocco": "Rabat", "Cuba": "Havana",
    "Iceland": "Reykjavik", "Colombia": "Bogota", "Ghana": "Accra",
}

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Max", "Lucy", "Tim", "Sara", "Leo", "Emma"]
ANIMALS = ["dog", "cat", "bird", "frog", "fish", "duck", "bunny", "puppy"]
ADJECTIVES = ["little", "happy", "red", "big", "soft", "funny", "kind", "small"]
PLACES = ["park", "garden", "beach", "forest", "river", "hill", "farm", "lake"]
THINGS = ["ball", "kite", "apple", "hat", "book", "cake", "toy", "flower"]


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def sft_rows(rng: random.Random) -> list[dict]:
    rows = []
    for word in WORDS * 2:  # 100 rows
        rows.append(chat(f"Reverse the word {word}.", word[::-1]))
    for country, city in CAPITALS.items():  # 80 rows, two phrasings
        rows.append(chat(f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        rows.append(chat(f"Name the capital city of {country}.", city))
    for word in rng.sample(WORDS, 50) * 2:  # 100 rows
        rows.append(chat(f"Spell {word} in capitals.", word.upper()))
    for _ in range(80):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append(chat(f"Add {a} and {b}.", f"{a} + {b} = {a + b}"))
    for _ in range(25):  # multi-turn: two assistant turns
        a, b, c = rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 9)
        rows.append({"messages": [
            {"role": "user", "content": f"Add {a} and {b}."},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
            {"role": "user", "content": f"Now add {c}."},
            {"role": "assistant", "content": f"{a + b} + {c} = {a + b + c}"},
        ]})
    for country in rng.sample(sorted(CAPITALS), 15):  # with a system message
        rows.append(chat(f"Capital of {country}?", CAPITALS[country], system="Answer in as few words as you can."))
    rng.shuffle(rows)
    return rows


def pretrain_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(300):
        name, animal, adj = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(ADJECTIVES)
        place, thing = rng.choice(PLACES), rng.choice(THINGS)
        story = rng.choice([
            f"{name} had a {adj} {animal}. They went to the {place} and played with a {thing}.",
            f"One day {name} found a {thing} at the {place}. The {adj} {animal} was very happy.",
            f"{name} and the {animal} walked to the {place}. The sun was warm and the {thing} was {adj}.",
        ])
        rows.append({"text": story})
    return rows


def pair(user: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def preference_rows(rng: random.Random) -> list[dict]:
    """Pairs whose chosen answer is right and rejected answer is plausibly wrong."""
    rows = []
    cities = list(CAPITALS.values())
    for country, city in CAPITALS.items():
        wrong = rng.choice([c for c in cities if c != city])
        rows.append(pair(f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                         f"The capital of {country} is {wrong}."))
    for word in WORDS:
        scrambled = word[1:] + word[0] if word[1:] + word[0] != word[::-1] else word
        rows.append(pair(f"Reverse the word {word}.", word[::-1], scrambled if scrambled != word[::-1] else word))
    for _ in range(110):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        off = rng.choice([-2, -1, 1, 2])
        rows.append(pair(f"Add {a} and {b}.", f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + off}"))
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    rng.shuffle(rows)
    return rows


def prompt_rows(rng: random.Random) -> list[dict]:
    """Prompts with a checkable answer, for online RL (task=grpo): sums and capitals."""
    rows = []
    for _ in range(160):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"prompt": [{"role": "user", "content": f"Add {a} and {b}. Answer with the number."}],
                     "answer": str(a + b)})
    for country, city in CAPITALS.items():
        rows.append({"prompt": [{"role": "user", "content": f"What is the capital of {country}?"}], "answer": city})
    rng.shuffle(rows)
    return rows


def prm_rows(rng: random.Random) -> list[dict]:
    """Step-labelled arithmetic for process reward models (task=prm): a + b * c in two steps.
    About half the solutions go wrong at one step (a product or a sum off by 1-3), and every
    step from the first wrong one on is labelled false, as Math-Shepherd labels them."""
    rows = []
    for _ in range(160):
        a, b, c = rng.randint(1, 20), rng.randint(2, 9), rng.randint(2, 9)
        product = b * c
        wrong_at = rng.choice([None, None, 0, 1])
        said_product = product + rng.choice([-3, -2, -1, 1, 2, 3]) if wrong_at == 0 else product
        said_sum = a + said_product + (rng.choice([-2, -1, 1, 2]) if wrong_at == 1 else 0)
        steps = [f"{b} * {c} = {said_product}.", f"{a} + {said_product} = {said_sum}."]
        labels = [wrong_at != 0, wrong_at is None]
        rows.append({"prompt": f"Compute {a} + {b} * {c} step by step.\n", "completions": steps, "labels": labels})
    return rows


def classifier_rows(rng: random.Random) -> list[dict]:
    """Three-way sentiment of templated one-line reviews (task=classifier): the adjective decides
    the label (positive, negative or neutral), the subject and the frame are noise."""
    words = {"positive": ["great", "lovely", "excellent", "wonderful", "superb"],
             "negative": ["awful", "terrible", "dreadful", "horrible", "poor"],
             "neutral": ["average", "ordinary", "fine", "plain", "standard"]}
    subjects = ["soup", "hotel", "film", "book", "train ride", "concert", "coffee", "game", "phone", "walk"]
    frames = ["The {s} was {w}.", "I found the {s} {w}.", "What a {w} {s}!", "Honestly, the {s} felt {w}."]
    rows = []
    for _ in range(240):
        label = rng.choice(sorted(words))
        text = rng.choice(frames).format(s=rng.choice(subjects), w=rng.choice(words[label]))
        rows.append({"text": text, "label": label})
    return rows


def embedding_rows(rng: random.Random) -> list[dict]:
    """Paraphrase pairs (task=embedding): one scene said two ways, so the anchor's positive is the
    one other sentence of the batch about the same who, what and where."""
    who = ["cat", "dog", "girl", "old man", "chef", "horse", "boy", "teacher", "bird", "farmer"]
    actions = [("sleeping", "sleeps"), ("eating", "eats"), ("running", "runs"), ("singing", "sings"),
               ("reading", "reads"), ("waiting", "waits"), ("dancing", "dances"), ("painting", "paints")]
    places = ["garden", "kitchen", "park", "station", "library", "field", "market", "boat"]
    first = ["The {w} is {ing} in the {p}.", "A {w} is {ing} in the {p}."]
    second = ["In the {p}, a {w} {s}.", "There is a {w} who {s} in the {p}.", "A {w} {s} in the {p}."]
    rows, seen = [], set()
    while len(rows) < 200:
        w, (ing, s), p = rng.choice(who), rng.choice(actions), rng.choice(places)
        if (w, ing, p) in seen:
            continue
        seen.add((w, ing, p))
        rows.append({"anchor": rng.choice(first).format(w=w, ing=ing, p=p),
                     "positive": rng.choice(second).format(w=w, s=s, p=p)})
    return rows


def choice_rows(rng: random.Random) -> list[dict]:
    """Multiple choice (soup.eval's demo suite): a country's capital among four cities, the answer a 0-based index."""
    rows, cities = [], sorted(set(CAPITALS.values()))
    for country, city in CAPITALS.items():
        choices = rng.sample([c for c in cities if c != city], 3) + [city]
        rng.shuffle(choices)
        rows.append({"question": f"The capital of {country} is", "choices": choices, "answer": choices.index(city)})
    return rows


def write_jsonl(path: Path, rows: list[dict], max_row_bytes: int = MAX_ROW_BYTES) -> None:
    lines = [json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in rows]
    too_long = [line for line in lines if len(line.encode()) > max_row_bytes]
    assert not too_long, f"rows over {max_row_bytes} bytes: {too_long[:2]}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT_DIR / "sft.jsonl", sft_rows(random.Random(0)))
    write_jsonl(OUT_DIR / "pretrain.jsonl", pretrain_rows(random.Random(1)))
    write_jsonl(OUT_DIR / "preference.jsonl", preference_rows(random.Random(2)), max_row_bytes=320)
    write_jsonl(OUT_DIR / "grpo.jsonl", prompt_rows(random.Random(3)))
    write_jsonl(OUT_DIR / "prm.jsonl", prm_rows(random.Random(4)))
    write_jsonl(OUT_DIR / "classifier.jsonl", classifier_rows(random.Random(5)))
    write_jsonl(OUT_DIR / "embedding.jsonl", embedding_rows(random.Random(6)))
    write_jsonl(OUT_DIR / "choice.jsonl", choice_rows(random.Random(7)))


if __name__ == "__main__":
    main()
