"""TinyStories-like text generated from a seeded grammar, for language-modelling curves offline.

Each story introduces a character (name, animal, trait), a place and an object (colour, kind), then
recalls them: later sentences repeat the name, pronoun, colour and object chosen at the start, so a
model that keeps a state of the story predicts them and one that does not is at the grammar's chance.
"""
from __future__ import annotations

import json
import os

import numpy as np

NAMES = {"he": ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Bob"],
         "she": ["Lily", "Mia", "Sue", "Anna", "Zoe", "Lucy", "Emma", "Amy"]}
ANIMALS = ["cat", "dog", "bird", "fox", "bear", "frog", "duck", "mouse", "rabbit", "lion"]
TRAITS = ["happy", "shy", "brave", "kind", "silly", "curious", "sleepy", "little"]
PLACES = ["park", "forest", "garden", "house", "farm", "river", "beach", "hill"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white"]
OBJECTS = ["ball", "box", "hat", "kite", "cup", "book", "drum", "shoe", "car", "boat"]
FEELINGS = ["happy", "sad", "surprised", "excited", "scared", "proud"]


def story(rng: np.random.Generator) -> str:
  pick = lambda xs: xs[rng.integers(len(xs))]
  he_she = pick(["he", "she"])
  name, friend = pick(NAMES[he_she]), pick(NAMES[pick(["he", "she"])])
  while friend == name:
    friend = pick(NAMES["he"] + NAMES["she"])
  animal, trait, place, colour, obj = pick(ANIMALS), pick(TRAITS), pick(PLACES), pick(COLOURS), pick(OBJECTS)
  pron, poss = he_she.capitalize(), "His" if he_she == "he" else "Her"
  s = [f"Once upon a time, there was a {trait} {animal} named {name}.",
       f"{name} lived near a big {place}.",
       f"One day, {name} found {'an' if colour[0] in 'aeiou' else 'a'} {colour} {obj} in the {place}."]
  for _ in range(rng.integers(1, 4)):
    s.append(pick([f"{pron} played with the {colour} {obj} all day.",
                   f"The {obj} was {colour} and shiny.",
                   f"{name} showed the {colour} {obj} to {friend}.",
                   f"{friend} wanted the {obj} too.",
                   f"{poss} {obj} rolled away, and {name} ran after it."]))
  feeling = pick(FEELINGS)
  s += [f"Then {name} gave the {colour} {obj} to {friend}.",
        f"{friend} was {feeling}, and the {trait} {animal} was {feeling} too.",
        f"From that day on, {name} and {friend} played in the {place} with the {colour} {obj}."]
  return " ".join(s)


def write_corpus(path: str, n_stories: int, seed: int = 0) -> str:
  """Writes `n_stories` stories as JSONL ({"text": ...} a line) to `path` (once); returns it."""
  if not os.path.exists(path):
    rng = np.random.default_rng(seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      for _ in range(n_stories):
        f.write(json.dumps({"text": story(rng)}) + "\n")
    os.replace(tmp, path)
  return path
