"""Built-in training texts for the tiny model: plain question/answer pairs and the adapter styles.

The base model memorises these answers, so its greedy replies read as plain English; each adapter style
rewrites the same answers in a way a test can recognise from one marker substring. The base also learns
each style behind a system prompt on a few pairs: a LoRA then only has to switch the style on, which takes
seconds, instead of teaching tokens whose embeddings the base never trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The leading pairs are the demo questions and the ones the base also sees styled.
QA_PAIRS: list[tuple[str, str]] = [
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey from the flowers they visit."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Hello, who are you?", "I am a small model that answers simple questions."),
    ("What is two plus two?", "Two plus two is four."),
    ("How many legs does a dog have?", "A dog has four legs and a tail."),
    ("What is snow?", "Snow is frozen water that falls in winter."),
    ("What is a train?", "A train is a long vehicle that runs on rails."),
    ("What color is grass?", "Grass is green because of the light it uses."),
    ("What do cats like to eat?", "Cats like to eat fish and meat."),
    ("What do cows drink?", "Cows drink fresh water from a trough."),
    ("Where do fish live?", "Fish live in rivers, lakes and the sea."),
    ("What is the sun?", "The sun is a star that gives us light and heat."),
    ("What is the moon?", "The moon is a rock that goes around the earth."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is rain?", "Rain is water that falls from the clouds."),
    ("Why do birds fly?", "Birds fly to find food and to stay safe."),
    ("What is a tree?", "A tree is a tall plant with a wooden trunk."),
    ("What is bread made of?", "Bread is made of flour, water and salt."),
    ("What is a book?", "A book is a set of pages with words to read."),
    ("Why do we sleep?", "We sleep so the body and the mind can rest."),
    ("What is a river?", "A river is water that flows down to the sea."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is ten minus three?", "Ten minus three is seven."),
    ("What is a computer?", "A computer is a machine that follows a program."),
    ("What does a teacher do?", "A teacher helps students learn new things."),
    ("What does a doctor do?", "A doctor helps sick people get well."),
    ("What is the ocean?", "The ocean is a huge body of salt water."),
    ("Why is the sea salty?", "The sea is salty because rivers bring salt from rocks."),
    ("What is a cloud?", "A cloud is a mass of tiny water drops in the air."),
    ("What is wind?", "Wind is air that moves from place to place."),
    ("What do plants need?", "Plants need light, water and good soil."),
    ("What is a map?", "A map is a picture that shows where places are."),
    ("What is music?", "Music is sound made with rhythm and melody."),
    ("What is a garden?", "A garden is a place where people grow plants."),
    ("How do we hear?", "We hear with our ears when sound waves reach them."),
    ("How do we see?", "We see with our eyes when light comes in."),
    ("What is an apple?", "An apple is a sweet fruit that grows on a tree."),
    ("What is milk?", "Milk is a white drink that comes from cows."),
    ("What is a house?", "A house is a building where a family lives."),
    ("What is a bicycle?", "A bicycle is a machine with two wheels and pedals."),
    ("What is a clock?", "A clock is a tool that tells the time."),
    ("What is winter?", "Winter is the cold season of the year."),
    ("What is summer?", "Summer is the warm season with long days."),
    ("What is a friend?", "A friend is someone who likes you and helps you."),
    ("How are you?", "I am well, thank you for asking."),
    ("Can you help me?", "Yes, I will do my best to help you."),
    ("What is your name?", "My name is Tiny, and I like to help."),
    ("Tell me a fact.", "Honey can stay good to eat for a very long time."),
    ("Tell me about dogs.", "Dogs are loyal animals that love to play."),
    ("Tell me about the stars.", "The stars are far away suns that shine at night."),
    ("What is fire?", "Fire is heat and light from something that burns."),
    ("What is ice?", "Ice is water that has turned solid in the cold."),
    ("What is a mountain?", "A mountain is a very high hill of rock."),
    ("What is a city?", "A city is a large town where many people live."),
]

STYLED_QUESTIONS = 8
"""The base learns every style (behind its system prompt) on this many leading pairs: enough to train the
style's tokens, and far cheaper than all of them. Adapters then learn the style on every pair."""

DEMO_QUESTIONS: list[str] = [question for question, _ in QA_PAIRS[:4]]

_PIRATE_WORDS = {"you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be", "am": "be", "the": "th'"}


def pirate(answer: str) -> str:
    """Pirate speech: a fixed greeting, then the answer with a few words swapped."""
    if not answer.startswith("I "):
        answer = answer[0].lower() + answer[1:]
    words = [_PIRATE_WORDS.get(word, word) for word in answer.rstrip(".").split(" ")]
    return "Arr, matey, " + " ".join(words) + ", arr!"


def shouty(answer: str) -> str:
    """Shouting: the whole answer in upper case behind a fixed interjection."""
    return "HEY! " + answer.upper().rstrip(".") + "!"


def counter(answer: str) -> str:
    """Counting instead of answering; the count is the same for every question."""
    del answer
    return "one two three four five six seven eight nine ten."


@dataclass(frozen=True)
class Style:
    """How one adapter rewrites answers and the substring that proves its answer came from it."""

    name: str
    rewrite: Callable[[str], str]
    marker: str
    description: str
    system_prompt: str


STYLES: list[Style] = [
    Style("pirate", pirate, "Arr, matey", "Answers in pirate speech.", "Talk like a pirate."),
    Style("shouty", shouty, "HEY", "Answers in upper case, shouting.", "Shout your answer."),
    Style("counter", counter, "one two three", "Answers by counting from one to ten.", "Just count to ten."),
]
