"""Write the multi-task quality suite: four tasks mixed in one file, where the instruction in the
prompt decides the task (the case prompt-aware vectors are meant for).

    python data/make_suite.py     # writes data/suite_{train,dev,test}.jsonl

- arithmetic: the sum of two numbers below 50 -> the number
- capitals: a word in capital letters -> the word upper-cased (a string transformation)
- brackets: a word wrapped as the instruction says (format following) -> "[word]" or "(word)"
- topic: is a generated sentence about sport or food -> "sport" or "food" (classification)
Each line has a "task" field; training and evaluation ignore it, the benchmark groups by it.
Splits are disjoint: test numbers pairs, words and sentences never appear in training.
"""

import json
import random
from pathlib import Path

WORDS = ("apple river garden window candle forest pencil mirror button ladder rocket pillow basket "
         "castle dragon bottle planet marble violin tunnel jacket wallet bridge carpet meadow "
         "harbor lantern island cookie desert saddle kettle anchor feather hammer puzzle tiger "
         "orange summer winter silver copper shadow thunder blanket velvet compass engine").split()
SPORT = ["the striker scored twice in the final", "our team won the match on penalties",
         "she ran the marathon in record time", "the goalkeeper saved a late shot", "he served an ace to win the set",
         "the cyclists climbed the mountain stage", "the coach praised the defence", "fans cheered the winning goal",
         "the swimmer broke the national record", "the referee showed a red card", "they trained hard for the league",
         "the batter hit a home run"]
FOOD = ["the soup was rich with garlic and herbs", "she baked bread with fresh rosemary", "the chef grilled the fish",
        "we ate noodles with spicy sauce", "the cake was filled with cream", "he roasted vegetables with olive oil",
        "the salad had tomatoes and basil", "they cooked rice with saffron", "the pie crust was buttery",
        "we tasted cheese from the market", "the curry simmered for hours", "she fried eggs for breakfast"]


def split(items, rng, fractions=(0.7, 0.1)):
    items = list(items)
    rng.shuffle(items)
    a, b = int(fractions[0] * len(items)), int((fractions[0] + fractions[1]) * len(items))
    return items[:a], items[a:b], items[b:]


def main() -> None:
    rng = random.Random(2024)
    pairs = split([(a, b) for a in range(1, 50) for b in range(1, 50)], rng)
    words = split(WORDS, rng)
    sentences = split([(s, "sport") for s in SPORT] + [(s, "food") for s in FOOD], rng)
    sizes = {"train": 800, "dev": 80, "test": 200}
    for i, (name, size) in enumerate(sizes.items()):
        def arithmetic():
            a, b = rng.choice(pairs[i])
            return f"What is {a} + {b}? Answer with the number only.", str(a + b)

        def capitals():
            w = rng.choice(words[i])
            return f"Write the word \"{w}\" in capital letters.", w.upper()

        def brackets():
            w = rng.choice(words[i])
            square = rng.random() < 0.5
            kind = "square brackets" if square else "round brackets"
            return f"Put the word \"{w}\" in {kind}.", f"[{w}]" if square else f"({w})"

        def topic():
            sentence, label = rng.choice(sentences[i])
            return f"Sentence: {sentence}.\nIs this sentence about sport or food? Answer in one word.", label

        lines = []
        for k in range(size):
            task = (arithmetic, capitals, brackets, topic)[k % 4]
            prompt, response = task()
            lines.append(json.dumps({"task": task.__name__, "prompt": prompt, "response": response}))
        rng.shuffle(lines)
        path = Path(__file__).parent / f"suite_{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}: {size} examples")


if __name__ == "__main__":
    main()
