#!/usr/bin/env python3
"""A deterministic generator of simple children's stories from a small grammar of our own.

    python -m demo.corpus --seed 0 --stories 20000 --out corpus.txt      (from the repository's root)

One story per line. `stories(seed, n)` returns the same list of strings for the same arguments
(Python's random.Random, seeded, is stable across platforms and versions); `vocabulary(seed, n)`
is the set of words those stories use. train.py regenerates its corpus from the seed, so no corpus
file needs to be kept.
"""
import argparse
import random
import re
import sys

NAMES = ["Mia", "Tom", "Ben", "Lucy", "Sam", "Zoe", "Max", "Ada", "Leo", "Nina", "Lily", "Tim",
         "Anna", "Jack", "Ella", "Finn"]
KINDS = ["cat", "dog", "bird", "fox", "frog", "bear", "duck", "fish", "owl", "bunny", "mouse",
         "girl", "boy", "pig", "lion", "sheep"]
PLACES = ["park", "garden", "forest", "river", "house", "school", "beach", "hill", "farm", "shop",
          "lake", "town"]
THINGS = ["ball", "kite", "hat", "book", "cake", "box", "boat", "drum", "shell", "apple", "toy",
          "car", "flower", "cup", "bell", "rock"]
ADJ = ["big", "small", "red", "blue", "green", "yellow", "shiny", "old", "new", "funny", "soft",
       "pretty"]
FEELINGS = ["happy", "sad", "scared", "proud", "tired", "curious", "surprised", "calm", "excited",
            "angry"]
GOOD_FEELINGS = ["happy", "proud", "calm", "excited"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm"]
TIMES = ["One day", "One morning", "In the afternoon", "After lunch", "That night", "Later"]
PLAY = ["run", "jump", "sing", "dance", "swim", "climb", "read", "draw"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PROBLEMS = [
    ("lost", "{thing}", "looked everywhere", "found it under a big leaf"),
    ("broke", "{thing}", "tried to fix it", "fixed it with some glue"),
    ("could not reach", "{thing}", "jumped and jumped", "stood on a box and got it"),
    ("dropped", "{thing} in the water", "waited by the water", "pulled it out with a stick"),
]


def plural(word):
    return word + "es" if word.endswith(("x", "s", "sh", "ch")) else word + "s"


def a(word):
    """word with its article: "a ball", "an apple"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(r, seq, *avoid):
    while True:
        x = r.choice(seq)
        if x not in avoid:
            return x


def story(r):
    """One story (a single line) drawn with the random.Random r."""
    name, kind, place = r.choice(NAMES), r.choice(KINDS), r.choice(PLACES)
    friend, fkind = _pick(r, NAMES, name), _pick(r, KINDS, kind)
    thing, adj = r.choice(THINGS), r.choice(ADJ)
    he = "She" if name in ("Mia", "Lucy", "Zoe", "Ada", "Nina", "Lily", "Anna", "Ella") else "He"
    his = "her" if he == "She" else "his"
    s = []
    opening = r.randint(0, 2)
    if opening == 0:
        s.append(f"Once upon a time, there was {a(r.choice(ADJ))} {kind} named {name}.")
    elif opening == 1:
        s.append(f"Once upon a time, a little {kind} named {name} lived near the {place}.")
    else:
        s.append(f"There was {a(kind)} named {name}. {he} lived in {a(r.choice(ADJ))} house.")
    s.append(f"{name} had {a(adj)} {thing}. {he} loved {his} {thing} very much.")
    events = [0, 1, 2, 3, 4, 5, 6]
    r.shuffle(events)
    for k in sorted(events[: r.randint(2, 4)]):
        if k == 0:
            s.append(f"{r.choice(TIMES)}, it was {r.choice(WEATHER)}. {name} went to the {place}.")
        elif k == 1:
            s.append(f"At the {place}, {name} met {a(fkind)} named {friend}.")
            s.append(f"\"Hello, {friend}!\" said {name}. \"Do you want to {r.choice(PLAY)} "
                     f"with me?\"")
            s.append(f"\"Yes!\" said {friend}. They played all day.")
        elif k == 2:
            n = r.choice(NUMBERS)
            t = r.choice(THINGS)
            s.append(f"{name} saw {n} {plural(t)} by the {r.choice(PLACES)}. "
                     f"{he} counted them: \"{n.capitalize()}!\"")
        elif k == 3:
            feel = r.choice(FEELINGS)
            s.append(f"{name} felt {feel}. \"I am {feel},\" {he.lower()} said.")
        elif k == 4:
            verb, obj, tried, fix = r.choice(PROBLEMS)
            obj = obj.format(thing=thing)
            s.append(f"Then {name} {verb} the {obj}. {he} was sad.")
            s.append(f"{name} {tried}. At last {he.lower()} "
                     f"{fix}.")
        elif k == 5:
            s.append(f"{name} liked to {r.choice(PLAY)} and {r.choice(PLAY)} "
                     f"in the {r.choice(PLACES)}.")
        else:
            n = r.randint(2, 12)
            s.append(f"Mom gave {name} {n} {r.choice(['apples', 'cookies', 'flowers'])}. "
                     f"\"Thank you, Mom!\" said {name}.")
    end = r.randint(0, 2)
    if end == 0:
        s.append(f"From that day on, {name} and {friend} were best friends.")
    elif end == 1:
        s.append(f"{name} went home and felt {r.choice(GOOD_FEELINGS)}. The end.")
    else:
        s.append(f"{name} learned that sharing is good. {he} was very {r.choice(GOOD_FEELINGS)}.")
    return " ".join(s)


def stories(seed=0, n=20000):
    """The first n stories for the seed, as a list of strings (one story each, no newlines)."""
    r = random.Random(seed)
    return [story(r) for _ in range(n)]


WORD = re.compile(r"[A-Za-z]+")


def words(text):
    """The words (runs of letters) of text, lower-cased."""
    return [w.lower() for w in WORD.findall(text)]


def vocabulary(seed=0, n=20000):
    """The set of lower-cased words that stories(seed, n) use."""
    vocab = set()
    for s in stories(seed, n):
        vocab.update(words(s))
    return vocab


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the synthetic story corpus.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stories", type=int, default=20000)
    parser.add_argument("--out", default="-", help="output file (default: stdout)")
    args = parser.parse_args(argv)
    text = "".join(s + "\n" for s in stories(args.seed, args.stories))
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
