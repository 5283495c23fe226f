"""Write the demo task: four short-answer tasks mixed in one file, where the instruction in
the prompt decides what to do (the case prompt-aware vectors are meant for).

    python data/make_demo.py        # writes data/demo_{train,dev,test}.jsonl

- sentiment: a templated product review -> "positive" or "negative"
- parity: is a number even or odd -> "even" or "odd"
- larger: the larger of two numbers -> the number
- opposite: the antonym of a common adjective -> the antonym
The instruct model answers these in sentences, often wrongly; after training it answers in
one word. Splits are disjoint: test reviews, numbers and adjectives never appear in training.
"""

import json
import random
from pathlib import Path

POSITIVE = ["wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "great", "amazing",
            "pleasant", "brilliant", "charming", "outstanding"]
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "disappointing", "poor", "bad", "miserable",
            "unpleasant", "mediocre", "annoying", "useless"]
THINGS = ["food", "service", "hotel room", "phone", "movie", "book", "headphones", "coffee", "laptop",
          "concert", "haircut", "bicycle", "shoes", "museum tour", "pizza", "camera"]
TEMPLATES = ["The {thing} was {word}.", "I found the {thing} {word}, honestly.", "What a {word} {thing}!",
             "Overall the {thing} was {word} and I would say so again.", "My {thing}? Simply {word}."]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("old", "new"), ("early", "late"), ("rich", "poor"), ("strong", "weak"), ("hard", "soft"),
             ("wet", "dry"), ("tall", "short"), ("loud", "quiet"), ("full", "empty"), ("clean", "dirty"),
             ("open", "closed"), ("thick", "thin"), ("high", "low"), ("young", "old"), ("cheap", "expensive"),
             ("heavy", "light"), ("long", "short"), ("near", "far"), ("safe", "dangerous"), ("easy", "difficult"),
             ("wide", "narrow"), ("deep", "shallow"), ("sweet", "sour"), ("true", "false"), ("good", "bad")]


def sentiment(rng, words, things):
    label = rng.choice(["positive", "negative"])
    word = rng.choice(words[label])
    review = rng.choice(TEMPLATES).format(thing=rng.choice(things), word=word)
    return f"Review: {review}\nIs this review positive or negative? Answer in one word.", label


def parity(rng, numbers):
    n = rng.choice(numbers)
    return f"Is {n} even or odd? Answer in one word.", "even" if n % 2 == 0 else "odd"


def larger(rng, numbers):
    a, b = rng.sample(numbers, 2)
    return f"Which number is larger, {a} or {b}? Answer with the number only.", str(max(a, b))


def opposite(rng, pairs):
    word, answer = rng.choice(pairs)
    return f"What is the opposite of the word \"{word}\"? Answer in one word.", answer


def split_items(items, rng, fractions=(0.7, 0.1, 0.2)):
    items = items[:]
    rng.shuffle(items)
    a = int(fractions[0] * len(items))
    b = a + max(1, int(fractions[1] * len(items)))
    return items[:a], items[a:b], items[b:]


def main() -> None:
    rng = random.Random(1234)
    numbers = split_items(list(range(10, 1000)), rng)
    pairs = split_items(OPPOSITES, rng)
    things = split_items(THINGS, rng)
    pos, neg = split_items(POSITIVE, rng), split_items(NEGATIVE, rng)
    sizes = {"train": 800, "dev": 80, "test": 200}
    out = Path(__file__).parent
    for i, (name, size) in enumerate(sizes.items()):
        words = {"positive": pos[i], "negative": neg[i]}
        makers = [lambda: sentiment(rng, words, things[i]), lambda: parity(rng, numbers[i]),
                  lambda: larger(rng, numbers[i]), lambda: opposite(rng, pairs[i])]
        lines = []
        for k in range(size):
            prompt, response = makers[k % len(makers)]()
            lines.append(json.dumps({"prompt": prompt, "response": response}))
        rng.shuffle(lines)
        (out / f"demo_{name}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"wrote {out / f'demo_{name}.jsonl'}: {size} examples")


if __name__ == "__main__":
    main()
