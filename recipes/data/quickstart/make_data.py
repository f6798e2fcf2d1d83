#!/usr/bin/env python3
"""Generate the offline quickstart preference dataset for lora-dpo.

BEHAVIOUR
---------
The assistant greets the user like a pirate before answering: every *chosen*
answer starts with the fixed opener ``"Ahoy! "`` followed by a short, correct
answer; the *rejected* answer is exactly the same correct answer without the
opener. The pair therefore differs only in the behaviour, never in content.

The string check used to measure the behaviour on greedy generations is::

    def has_behaviour(completion: str) -> bool:
        return completion.lstrip().startswith("Ahoy")

(See :func:`has_behaviour` below; the base SmolLM2-135M-Instruct model never
starts an answer this way, so the rate before training is ~0 %.)

DATA
----
Short factual / everyday questions from a dozen categories (capitals,
arithmetic, antonyms, animal sounds and babies, colours, days and months,
plurals, unit conversions, first letters, comparisons, general facts, short
tips), each asked with one of several phrasings. Splitting is done at the
level of the underlying *fact*, so no eval prompt (nor the fact behind it)
appears in train. Everything is hand-written here and generated with a fixed
seed: running the script twice yields byte-identical files.

TRAINING NOTE
-------------
Because chosen and rejected share the answer text, plain DPO on this data
(sigmoid loss alone) teaches the opener but wrecks what follows it: within
~20-40 steps the 135M model answers "Ahoy!" and stops, repeats "Ahoy! Ahoy!",
or babbles, since pushing the rejected answer down also pushes down the answer
it shares with the chosen one. Adding the chosen-answer NLL (RPO,
``dpo.rpo_alpha: 1.0``; TRL: ``loss_type=["sigmoid", "sft"]``) fixes it:
beta 0.5, lr 5e-4, 40 steps of batch 4 give 100 % "Ahoy! <answer>" on eval.

Usage::

    python make_data.py            # writes train.jsonl and eval.jsonl next to this file
    python make_data.py --out DIR  # elsewhere
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 400
N_EVAL = 50
OPENER = "Ahoy! "


def has_behaviour(completion: str) -> bool:
    """The behaviour check: does the answer open with the pirate greeting?"""
    return completion.lstrip().startswith("Ahoy")


# ---------------------------------------------------------------------------
# Fact banks. Each generator returns a list of "facts"; a fact is a list of
# (prompt, answer) variants (different phrasings of the same question). One
# variant per fact is drawn, and facts are split between train and eval.
# ---------------------------------------------------------------------------

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Russia", "Moscow"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("India", "New Delhi"), ("Turkey", "Ankara"), ("Cuba", "Havana"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Hungary", "Budapest"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Iceland", "Reykjavik"),
    ("Vietnam", "Hanoi"), ("the United Kingdom", "London"), ("Switzerland", "Bern"),
    ("the Czech Republic", "Prague"), ("Indonesia", "Jakarta"), ("Ghana", "Accra"),
    ("Brazil", "Brasilia"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Pakistan", "Islamabad"),
    ("the Philippines", "Manila"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("New Zealand", "Wellington"), ("Saudi Arabia", "Riyadh"), ("Iran", "Tehran"),
]


def capitals():
    facts = []
    for country, city in CAPITALS:
        facts.append([
            (f"What is the capital of {country}?", f"The capital of {country} is {city}."),
            (f"Which city is the capital of {country}?", f"{city} is the capital of {country}."),
            (f"Name the capital city of {country}.", f"The capital city of {country} is {city}."),
            (f"Tell me the capital of {country}, please.", f"The capital of {country} is {city}."),
            (f"quick geography check: capital of {country}?", f"It's {city}."),
        ])
    return facts


def arithmetic(rng: random.Random):
    facts, seen = [], set()
    while len(facts) < 105:
        op = rng.choice("+-*")
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        if op == "-" and b > a:
            a, b = b, a
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        if op == "+":
            r = a + b
            facts.append([
                (f"What is {a} plus {b}?", f"{a} plus {b} is {r}."),
                (f"Add {a} and {b}.", f"{a} + {b} = {r}."),
                (f"How much is {a} + {b}?", f"{a} + {b} is {r}."),
                (f"If I have {a} apples and get {b} more, how many do I have?",
                 f"You have {r} apples."),
            ])
        elif op == "-":
            r = a - b
            facts.append([
                (f"What is {a} minus {b}?", f"{a} minus {b} is {r}."),
                (f"Compute {a} - {b}.", f"{a} - {b} = {r}."),
                (f"Subtract {b} from {a}.", f"{a} minus {b} equals {r}."),
                (f"I had {a} coins and spent {b}. How many are left?", f"You have {r} coins left."),
            ])
        else:
            r = a * b
            facts.append([
                (f"What is {a} times {b}?", f"{a} times {b} is {r}."),
                (f"Multiply {a} by {b}.", f"{a} x {b} = {r}."),
                (f"What's {a} * {b}?", f"{a} * {b} is {r}."),
                (f"How many wheels do {a} cars with {b} wheels each have in total?",
                 f"They have {r} wheels in total."),
            ])
    return facts


ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
    ("light", "dark"), ("early", "late"), ("full", "empty"), ("open", "closed"), ("young", "old"),
    ("loud", "quiet"), ("hard", "soft"), ("wet", "dry"), ("rich", "poor"), ("strong", "weak"),
    ("tall", "short"), ("clean", "dirty"), ("near", "far"), ("win", "lose"), ("day", "night"),
    ("begin", "end"), ("push", "pull"), ("buy", "sell"), ("thick", "thin"), ("brave", "cowardly"),
    ("inside", "outside"), ("heavy", "light"), ("cheap", "expensive"), ("smooth", "rough"),
    ("sweet", "sour"),
]


def antonyms():
    facts = []
    for w, o in ANTONYMS:
        facts.append([
            (f"What is the opposite of \"{w}\"?", f"The opposite of \"{w}\" is \"{o}\"."),
            (f"Give me an antonym for {w}.", f"An antonym for {w} is {o}."),
            (f"Which word means the opposite of {w}?", f"{o.capitalize()} is the opposite of {w}."),
            (f"opposite of {w}?", f"The opposite of {w} is {o}."),
        ])
    return facts


ANIMAL_SOUNDS = [
    ("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"),
    ("sheep", "bleats"), ("horse", "neighs"), ("pig", "oinks"), ("owl", "hoots"), ("snake", "hisses"),
    ("bee", "buzzes"), ("frog", "croaks"), ("wolf", "howls"), ("rooster", "crows"), ("mouse", "squeaks"),
]
ANIMAL_BABIES = [
    ("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("horse", "foal"), ("sheep", "lamb"),
    ("goat", "kid"), ("frog", "tadpole"), ("kangaroo", "joey"), ("swan", "cygnet"), ("bear", "cub"),
    ("duck", "duckling"), ("owl", "owlet"), ("goose", "gosling"), ("pig", "piglet"), ("deer", "fawn"),
]


def animals():
    facts = []
    for a, s in ANIMAL_SOUNDS:
        facts.append([
            (f"What sound does a {a} make?", f"A {a} {s}."),
            (f"How does a {a} sound?", f"A {a} {s}."),
            (f"What noise do you hear from a {a}?", f"You hear a {a} when it {s}."),
        ])
    for a, b in ANIMAL_BABIES:
        facts.append([
            (f"What is a baby {a} called?", f"A baby {a} is called a {b}."),
            (f"What do you call a young {a}?", f"A young {a} is called a {b}."),
            (f"Name for a baby {a}?", f"It's called a {b}."),
        ])
    return facts


COLOURS = [
    ("a ripe banana", "yellow"), ("fresh grass", "green"), ("the sky on a clear day", "blue"),
    ("snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"),
    ("an eggplant", "purple"), ("a lemon", "yellow"), ("chocolate", "brown"),
    ("a fire truck", "red"), ("milk", "white"), ("a pumpkin", "orange"), ("a lime", "green"),
    ("a polar bear's fur", "white"), ("a crow", "black"),
]


def colours():
    facts = []
    for thing, c in COLOURS:
        facts.append([
            (f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {c}."),
            (f"Tell me the colour of {thing}.", f"The colour of {thing} is {c}."),
            (f"What colour would you say {thing} is?", f"{thing[0].upper() + thing[1:]} is usually {c}."),
        ])
    return facts


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def calendar():
    facts = []
    for i, d in enumerate(DAYS):
        n, p = DAYS[(i + 1) % 7], DAYS[(i - 1) % 7]
        facts.append([
            (f"What day comes after {d}?", f"{n} comes after {d}."),
            (f"If today is {d}, what day is tomorrow?", f"Tomorrow is {n}."),
        ])
        facts.append([
            (f"Which day comes before {d}?", f"{p} comes before {d}."),
            (f"If today is {d}, what was yesterday?", f"Yesterday was {p}."),
        ])
    for i, m in enumerate(MONTHS):
        n = MONTHS[(i + 1) % 12]
        facts.append([
            (f"Which month comes after {m}?", f"{n} comes after {m}."),
            (f"What month follows {m}?", f"{n} follows {m}."),
            (f"What is month number {i + 1} of the year?", f"Month number {i + 1} is {m}."),
        ])
    return facts


PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"),
    ("goose", "geese"), ("man", "men"), ("woman", "women"), ("person", "people"),
    ("box", "boxes"), ("city", "cities"), ("knife", "knives"), ("leaf", "leaves"),
    ("wolf", "wolves"), ("cactus", "cacti"), ("fish", "fish"), ("ox", "oxen"),
    ("baby", "babies"), ("bus", "buses"),
]


def plurals():
    facts = []
    for s, p in PLURALS:
        facts.append([
            (f"What is the plural of \"{s}\"?", f"The plural of \"{s}\" is \"{p}\"."),
            (f"How do you say more than one {s}?", f"More than one {s} is {p}."),
            (f"plural of {s}", f"The plural of {s} is {p}."),
        ])
    return facts


def units(rng: random.Random):
    facts = []
    for n in range(2, 9):
        facts.append([
            (f"How many minutes are in {n} hours?", f"There are {60 * n} minutes in {n} hours."),
            (f"Convert {n} hours to minutes.", f"{n} hours is {60 * n} minutes."),
        ])
        facts.append([
            (f"How many days are in {n} weeks?", f"There are {7 * n} days in {n} weeks."),
            (f"{n} weeks is how many days?", f"{n} weeks is {7 * n} days."),
        ])
        facts.append([
            (f"How many centimeters are in {n} meters?", f"There are {100 * n} centimeters in {n} meters."),
            (f"Convert {n} meters to centimeters.", f"{n} meters is {100 * n} centimeters."),
        ])
        facts.append([
            (f"How many grams are in {n} kilograms?", f"There are {1000 * n} grams in {n} kilograms."),
            (f"{n} kg in grams?", f"{n} kilograms is {1000 * n} grams."),
        ])
    return facts


LETTER_WORDS = ["apple", "river", "garden", "pencil", "window", "tiger", "orange", "house",
                "moon", "bridge", "candle", "jacket", "kettle", "lemon", "night", "zebra",
                "violin", "umbrella", "yogurt", "engine"]


def letters():
    facts = []
    for w in LETTER_WORDS:
        facts.append([
            (f"What is the first letter of the word \"{w}\"?", f"The first letter of \"{w}\" is \"{w[0]}\"."),
            (f"Which letter does \"{w}\" start with?", f"\"{w}\" starts with the letter {w[0].upper()}."),
        ])
        facts.append([
            (f"How many letters are in the word \"{w}\"?", f"\"{w}\" has {len(w)} letters."),
        ])
    return facts


def comparisons(rng: random.Random):
    facts, seen = [], set()
    while len(facts) < 40:
        a, b = rng.sample(range(3, 200), 2)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        hi, lo = max(a, b), min(a, b)
        facts.append([
            (f"Which is larger, {a} or {b}?", f"{hi} is larger than {lo}."),
            (f"Which number is smaller: {a} or {b}?", f"{lo} is smaller than {hi}."),
            (f"Is {a} bigger than {b}?", f"{'Yes' if a > b else 'No'}, {hi} is bigger than {lo}."),
        ])
    return facts


GENERAL = [
    [("How many legs does a spider have?", "A spider has eight legs."),
     ("Count the legs on a spider.", "Spiders have eight legs.")],
    [("How many legs does an insect have?", "An insect has six legs.")],
    [("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
     ("What planet do people call the Red Planet?", "That is Mars.")],
    [("What is the largest planet in our solar system?", "Jupiter is the largest planet."),
     ("Name the biggest planet in the solar system.", "The biggest planet is Jupiter.")],
    [("What do bees make?", "Bees make honey."),
     ("What sweet food is made by bees?", "Honey is made by bees.")],
    [("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius.")],
    [("At what temperature does water boil at sea level in Celsius?", "Water boils at 100 degrees Celsius.")],
    [("How many days are in a week?", "There are seven days in a week.")],
    [("How many months are in a year?", "There are twelve months in a year.")],
    [("How many hours are in a day?", "There are 24 hours in a day.")],
    [("What gas do plants take in from the air?", "Plants take in carbon dioxide."),
     ("Which gas do plants absorb for photosynthesis?", "They absorb carbon dioxide.")],
    [("What do humans need to breathe to stay alive?", "Humans need to breathe oxygen.")],
    [("Which is the closest star to Earth?", "The Sun is the closest star to Earth.")],
    [("What is frozen water called?", "Frozen water is called ice.")],
    [("How many sides does a triangle have?", "A triangle has three sides.")],
    [("How many sides does a hexagon have?", "A hexagon has six sides.")],
    [("How many sides does a square have?", "A square has four sides.")],
    [("What is the largest ocean on Earth?", "The Pacific is the largest ocean.")],
    [("What is the tallest animal in the world?", "The giraffe is the tallest animal.")],
    [("What is the largest mammal?", "The blue whale is the largest mammal.")],
    [("Which animal is known as the king of the jungle?", "The lion is called the king of the jungle.")],
    [("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths.")],
    [("What is the main ingredient in guacamole?", "The main ingredient is avocado.")],
    [("What do cows drink?", "Cows drink water."),
     ("Do cows drink milk?", "No, cows drink water.")],
    [("Which organ pumps blood around the body?", "The heart pumps blood around the body.")],
    [("What instrument has black and white keys?", "A piano has black and white keys.")],
    [("How many players are on a soccer team on the field?", "There are eleven players per team.")],
    [("Which direction does the sun rise from?", "The sun rises in the east.")],
    [("Which direction does the sun set?", "The sun sets in the west.")],
    [("What is the chemical symbol for gold?", "The symbol for gold is Au.")],
    [("What is H2O more commonly called?", "H2O is water.")],
    [("What shape has no corners?", "A circle has no corners.")],
    [("How many continents are there?", "There are seven continents.")],
    [("Who wrote Romeo and Juliet?", "William Shakespeare wrote it.")],
    [("What is the fastest land animal?", "The cheetah is the fastest land animal.")],
    [("What do you call a word that means the same as another word?", "That is a synonym.")],
    [("How many strings does a standard guitar have?", "A standard guitar has six strings.")],
    [("What does a thermometer measure?", "A thermometer measures temperature.")],
    [("Which season comes after winter?", "Spring comes after winter.")],
    [("Which season comes after summer?", "Autumn comes after summer.")],
]

TIPS = [
    [("Give me a quick tip for sleeping better.", "Keep a regular bedtime and avoid screens before bed.")],
    [("How can I stay focused while studying?", "Work in short blocks and put your phone away.")],
    [("Any tip for drinking more water?", "Carry a water bottle and sip from it often.")],
    [("How do I keep a houseplant healthy?", "Give it light, and water it only when the soil is dry.")],
    [("What's a simple way to save money?", "Set aside a little from every paycheck first.")],
    [("Suggest a quick breakfast idea.", "Try oatmeal with banana slices.")],
    [("How can I remember new words?", "Review them a few times over several days.")],
    [("Give me a tip for a job interview.", "Prepare a few examples of your past work.")],
    [("How do I calm down before a speech?", "Take slow, deep breaths and practice beforehand.")],
    [("What's a good way to start exercising?", "Begin with a short daily walk.")],
    [("How do I make my tea less bitter?", "Steep it for less time or use cooler water.")],
    [("Recommend a way to relax after work.", "Go for a short walk or read a book.")],
    [("How can I be more productive in the morning?", "Plan your top task the night before.")],
    [("Say hello to me.", "Hello there, nice to meet you.")],
    [("Can you greet my friend Sam?", "Hello Sam, nice to meet you.")],
    [("Say something nice about the weekend.", "Weekends are a great time to rest.")],
    [("Describe a cat in one sentence.", "A cat is a small, furry, curious pet.")],
    [("Describe the ocean in one sentence.", "The ocean is vast, deep and full of life.")],
    [("Write a one-line thank you note.", "Thank you so much for your help.")],
    [("Tell me a fun fact about octopuses.", "An octopus has three hearts.")],
    [("Give me a word that rhymes with cat.", "Hat rhymes with cat.")],
    [("Give me a word that rhymes with moon.", "Spoon rhymes with moon.")],
    [("Name a fruit that is yellow.", "A banana is a yellow fruit.")],
    [("Name a vegetable that is green.", "Broccoli is a green vegetable.")],
    [("Name a bird that cannot fly.", "The penguin cannot fly.")],
    [("Name a musical instrument you blow into.", "A flute is played by blowing into it.")],
    [("Name a sport played with a racket.", "Tennis is played with a racket.")],
    [("Is the sun a star?", "Yes, the sun is a star.")],
    [("Is a tomato a fruit?", "Yes, botanically a tomato is a fruit.")],
    [("Can fish breathe air like we do?", "No, most fish breathe through gills.")],
]

PREFIXES = ["", "", "", "", "Quick question: ", "Hey, ", "Please answer briefly. ",
            "I was wondering: ", "Help me out: "]


def style(prompt: str, rng: random.Random) -> str:
    """Light surface variation so prompts don't all look alike."""
    pre = rng.choice(PREFIXES)
    if pre and prompt[0].isupper() and not prompt.startswith(("I ", "I'")):
        prompt = prompt[0].lower() + prompt[1:]
    return pre + prompt


def build(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL):
    rng = random.Random(seed)
    facts = (capitals() + arithmetic(rng) + antonyms() + animals() + colours() + calendar()
             + plurals() + units(rng) + letters() + comparisons(rng) + GENERAL + TIPS)
    rng.shuffle(facts)
    need = n_train + n_eval
    assert len(facts) >= need, (len(facts), need)
    eval_facts, train_facts = facts[:n_eval], facts[n_eval:need]

    def rows(fs):
        out = []
        for variants in fs:
            prompt, answer = rng.choice(variants)
            out.append({
                "prompt": [{"role": "user", "content": style(prompt, rng)}],
                "chosen": [{"role": "assistant", "content": OPENER + answer}],
                "rejected": [{"role": "assistant", "content": answer}],
            })
        return out

    train, ev = rows(train_facts), rows(eval_facts)
    train_prompts = {r["prompt"][0]["content"] for r in train}
    assert not any(r["prompt"][0]["content"] in train_prompts for r in ev)
    return train, ev


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    train, ev = build(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", ev)):
        with open(args.out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
