"""The embedded default dataset: reading-comprehension passages generated from a seed, in SQuAD 2.0 JSON.

Each article describes a few invented people, towns and companies in varied sentence templates, with
same-type distractors (several years, several names) so that the question has to be read. About a
third of the questions of the main splits are unanswerable *hard* ones: the entity is in the
passage but the asked fact is not (a plausible span of the right type is). The warm-up ``pool``
comes from a related but different distribution: other question templates, not every question
type, and only easy unanswerables (the entity is absent). A model warmed up on the pool follows the
QA format but makes mistakes on the main splits, which leaves fine-tuning something real to learn.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from laffi_exp.data.base import DataSource, check_sizes

GENERATOR_VERSION = 2  # bump on any change to what generate() returns (it keys cached base models)

FIRST = (
    "Ada Alma Anton Aria Boris Clara Dario Elena Emil Farah Greta Hugo Ines Ivan Jonas Kira Lena "
    "Luca Marta Milan Nadia Nora Oskar Petra Rafael Rosa Sami Sofia Tomas Vera Viktor Yara Zora Felix "
    "Hanna Igor Lars Mira Otto Paula"
).split()
SYLLABLES = (
    "ka lo ve ran tis mor bel dun fa gor hel ish jar kem lun mar nos pel quin ros sal tem ur vas wen "
    "zan bro cla dre fin gla"
).split()
TOWN_SUFFIX = ("burg", "ton", "vik", "dal", "mont", "field", "stad", "port")
ORG_SUFFIX = ("Works", "Labs", "Company", "Mills", "Press", "Foundry")
JOBS = (
    "baker carpenter chemist painter sailor teacher surgeon poet banker architect engineer "
    "farmer lawyer singer weaver astronomer"
).split()
PRODUCTS = "clocks bicycles glass maps pianos rope tea lenses radios soap paper boats".split()


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


@dataclass
class _World:
    """The facts of one article. Values are strings exactly as they appear in the passage."""

    person: str
    born_year: str
    town: str
    job: str
    org: str
    org_year: str
    product: str
    river: str
    population: str
    spouse: str
    other: str  # a second person, used as a distractor
    other_year: str


def _world(rng: random.Random) -> _World:
    years = rng.sample(range(1720, 1990), 3)
    p, s, o = (f"{rng.choice(FIRST)} {_word(rng, 2)}" for _ in range(3))
    return _World(
        person=p,
        born_year=str(min(years)),
        town=_word(rng, 1) + rng.choice(TOWN_SUFFIX),
        job=rng.choice(JOBS),
        org=f"{_word(rng, 2)} {rng.choice(ORG_SUFFIX)}",
        org_year=str(max(years)),
        product=rng.choice(PRODUCTS),
        river=_word(rng, 2),
        population=f"{rng.randrange(2, 99)},{rng.randrange(100, 999)}",
        spouse=s,
        other=o,
        other_year=str(sorted(years)[1]),
    )


# Fact sentences: (fact name, template). Every article states a random subset of these facts.
FACTS = {
    "born_year": ("{person} was born in {born_year}.", "In {born_year}, {person} was born."),
    "town": ("{person} grew up in {town}.", "{person} spent a childhood in {town}."),
    "job": ("{person} worked as a {job}.", "By trade, {person} was a {job}."),
    "org": ("In {org_year}, {person} founded {org}.", "{person} set up {org} in {org_year}."),
    "product": ("{org} made {product}.", "{org} became known for its {product}."),
    "river": ("{town} lies on the {river} River.", "The {river} River flows through {town}."),
    "population": ("{town} has {population} inhabitants.", "About {population} people live in {town}."),
    "spouse": ("{person} married {spouse}.", "{spouse} was the spouse of {person}."),
    "other": ("{other} was born in {other_year}.", "{other}, a rival, was born in {other_year}."),
}

# Question templates per fact, in two families that share no template: the warm-up pool asks in its
# own words (and never meets a hard unanswerable), the main splits ask in others.
POOL_QUESTIONS = {
    "born_year": ("When was {person} born?", "What year was {person} born in?"),
    "town": ("Where did {person} grow up?", "Where was {person} brought up?"),
    "job": ("What was the job of {person}?", "What was {person} by profession?"),
    "org": ("What did {person} found?", "What was founded by {person}?"),
    "product": ("What did {org} make?", "What goods did {org} sell?"),
    "river": ("What river is {town} on?", "Which river runs through {town}?"),
    "population": ("How large is the population of {town}?", "How many inhabitants does {town} have?"),
    "spouse": ("Whom did {person} wed?", "Who was married to {person}?"),
}
MAIN_QUESTIONS = {
    "born_year": ("In which year was {person} born?", "{person} was born in what year?"),
    "town": ("Which town did {person} grow up in?", "In what town was {person} raised?"),
    "job": ("What did {person} work as?", "What trade did {person} have?"),
    "org": ("Which company was founded by {person}?", "Name the company {person} set up."),
    "product": ("What was {org} known for?", "What did {org} produce?"),
    "river": ("On which river does {town} lie?", "Which river flows through {town}?"),
    "population": ("How many people live in {town}?", "What is the population of {town}?"),
    "spouse": ("Who did {person} marry?", "Who was the spouse of {person}?"),
}
# For a hard unanswerable question: which stated fact gives a plausible (wrong) span of the right type.
PLAUSIBLE = {
    "born_year": "other",
    "town": "river",
    "job": "product",
    "org": "town",
    "product": "job",
    "river": "town",
    "population": "org_year",
    "spouse": "other",
}
ANSWER_OF = {
    "born_year": "born_year",
    "town": "town",
    "job": "job",
    "org": "org",
    "product": "product",
    "river": "river",
    "population": "population",
    "spouse": "spouse",
    "other": "other",
    "org_year": "org_year",
}


def _qid(seed: int, split: str, i: int, j: int) -> str:
    return hashlib.sha1(f"{seed}/{split}/{i}/{j}".encode()).hexdigest()[:24]


def _span(context: str, text: str) -> dict:
    start = context.find(text)
    assert start >= 0, (text, context)
    return {"text": text, "answer_start": start}


def _article(rng: random.Random, seed: int, split: str, i: int, unanswerable: float) -> dict:
    w = _world(rng)
    values = vars(w)
    pool = split == "pool"
    facts = [f for f in FACTS if rng.random() < 0.55 or f in ("born_year", "other")]
    rng.shuffle(facts)
    context = " ".join(rng.choice(FACTS[f]).format(**values) for f in facts)
    questions = POOL_QUESTIONS if pool else MAIN_QUESTIONS
    stated = [f for f in sorted(questions) if f in facts]
    unstated = [f for f in sorted(questions) if f not in facts]
    person_facts = [f for f in stated if "{person}" in questions[f][0] and f != "born_year"]
    rng.shuffle(stated)
    qas = []
    for j in range(3):
        qa = {"question": "", "id": _qid(seed, split, i, j), "answers": [], "is_impossible": True}
        if rng.random() >= unanswerable and stated:
            fact = stated.pop()
            qa["is_impossible"] = False
            qa["answers"] = [_span(context, values[ANSWER_OF[fact]])]
            qa["question"] = rng.choice(questions[fact]).format(**values)
        elif pool:
            # Easy unanswerable: the question is about someone who is not in the passage.
            fact = rng.choice(sorted(questions))
            stranger = f"{rng.choice(FIRST)} {_word(rng, 2)}"
            subst = {"person": stranger, "org": f"{_word(rng, 2)} Works", "town": _word(rng, 1) + "ton"}
            qa["question"] = rng.choice(questions[fact]).format(**{**values, **subst})
            qa["plausible_answers"] = []
        elif person_facts and (not unstated or rng.random() < 0.5):
            # Hard unanswerable: the fact is stated, but for another person than the one asked about.
            fact = person_facts.pop(rng.randrange(len(person_facts)))
            qa["question"] = rng.choice(questions[fact]).format(**{**values, "person": w.other})
            qa["plausible_answers"] = [_span(context, values[ANSWER_OF[fact]])]
        elif unstated:
            # Hard unanswerable: the entity is there, the fact is not, a same-type span often is.
            fact = unstated.pop(rng.randrange(len(unstated)))
            qa["question"] = rng.choice(questions[fact]).format(**values)
            value = values[ANSWER_OF[PLAUSIBLE[fact]]]
            qa["plausible_answers"] = [_span(context, value)] if value in context else []
        else:
            continue
        if qa["question"] not in {q["question"] for q in qas}:
            qas.append(qa)
    return {"title": f"{split}_{i:05d}", "paragraphs": [{"context": context, "qas": qas}]}


def generate(seed: int, split: str, num_questions: int) -> dict:
    """Generate about ``num_questions`` questions of ``split`` (train, validation, test or pool).

    The same (seed, split, num_questions) always gives the same file; splits never share articles.
    """
    if split not in ("train", "validation", "test", "pool"):
        raise ValueError(f"unknown split {split!r}: expected train, validation, test or pool")
    rng = random.Random(f"laffi-synthetic/{seed}/{split}")
    unanswerable = 0.1 if split == "pool" else 1 / 3
    data, count, i = [], 0, 0
    while count < num_questions:
        article = _article(rng, seed, split, i, unanswerable)
        qas = article["paragraphs"][0]["qas"]
        del qas[num_questions - count :]
        if qas:
            data.append(article)
            count += len(qas)
        i += 1
    return {"version": f"laffi-synthetic-v1/{split}", "data": data}


class SyntheticQA(DataSource):
    """The embedded default dataset as a pipeline data source: train, validation and test splits in
    SQuAD JSON layout, generated (not downloaded) from ``seed``."""

    def __init__(
        self, name: str = "synthetic", seed: int = 1234, num_train: int = 1000, num_val: int = 200, num_eval: int = 600
    ):
        self.name = name
        self.seed = seed
        self.sizes = {"train": num_train, "validation": num_val, "test": num_eval}

    def check(self) -> None:
        check_sizes(self.sizes)

    def splits(self) -> dict[str, dict]:
        return {split: generate(self.seed, split, n) for split, n in self.sizes.items()}
