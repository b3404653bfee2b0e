"""A synthetic, E2E-like restaurant task: our own MR generator and templated references.

Meaning representations use the eight E2E slots (``name, eatType, food, priceRange,
customer rating, area, familyFriendly, near``) with invented venue names and landmarks; no
text comes from any dataset. Each MR gets several references written from varied templates
(the opening sentence, the wording of each slot and where the location goes change between
references). Every slot value is copied verbatim into the text and slots are realized in MR
order, so a tiny model learns the task in a few hundred steps; it powers the offline demo
and the test suite.

Everything is a pure function of the seed: the MRs of a split come from a
`random.Random` seeded by ``(seed, split)``, and the references of an MR from one seeded by
``(seed, source)``, so an MR reads the same in every split and run.
"""

from __future__ import annotations

import random

from lora_repro.data.e2e import linearize_slots
from lora_repro.data.records import Example, TaskData, TestSource

NAMES = (
    "The Copper Kettle", "Juniper House", "The Blue Heron", "Saffron Lane", "Harbour Light",
    "The Green Lantern", "Maple Table", "The Red Fox", "Little Orchard", "The Silver Spoon",
    "Bramble Kitchen", "The Lazy Otter", "Oak and Ember", "The Painted Door", "Riverbend",
    "The Brass Compass",
)
LANDMARKS = (
    "Central Station", "the Town Hall", "the Old Bridge", "the Market Square",
    "the Science Museum", "the Botanic Garden", "the Clock Tower", "the Theatre Royal",
)
# Slot -> values, in E2E's slot order. `name` is always present; others are optional.
SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "name": NAMES,
    "eatType": ("restaurant", "pub", "coffee shop"),
    "food": ("English", "French", "Italian", "Chinese", "Japanese", "Indian", "Fast food"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("riverside", "city centre"),
    "familyFriendly": ("yes", "no"),
    "near": LANDMARKS,
}
OPTIONAL_SLOTS = tuple(s for s in SLOT_VALUES if s != "name")
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


def sample_mr(rng: random.Random, min_slots: int = 2, max_slots: int = 5) -> list[tuple[str, str]]:
    """One MR: the name plus `min_slots`..`max_slots` optional slots, in E2E slot order."""
    k = rng.randint(min_slots, max_slots)
    slots = sorted(rng.sample(OPTIONAL_SLOTS, k), key=OPTIONAL_SLOTS.index)
    return [(s, rng.choice(SLOT_VALUES[s])) for s in ("name", *slots)]


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def _sentence(slot: str, value: str, rng: random.Random) -> str:
    """One attribute sentence for an optional slot (other than eatType/food)."""
    graded = value in ("low", "average", "high", "cheap", "moderate")
    choices = {
        "priceRange": (
            [f"Prices are {value}.", f"It has {value} prices.", f"It is {value} priced."]
            if graded else [f"Prices are {value}.", f"It costs {value}.", f"Meals cost {value}."]
        ),
        "customer rating": (
            [f"It has {_a(value)} customer rating.", f"Customers rate it {value}."]
            if graded else [f"It has a customer rating of {value}.", f"It is rated {value}."]
        ),
        "familyFriendly": (
            ["It is family friendly.", "Children are welcome.", "It is kid friendly."]
            if value == "yes" else
            ["It is not family friendly.", "Children are not welcome.", "It is not kid friendly."]
        ),
        "area": [
            f"It is in the {value} area.",
            "It is by the riverside." if value == "riverside" else f"It is located in the {value}.",
        ],
        "near": [f"It is near {value}.", f"You can find it near {value}."],
    }[slot]
    return rng.choice(choices)


def realize(pairs: list[tuple[str, str]], rng: random.Random) -> str:
    """One templated reference for an MR; every slot value appears verbatim.

    The first sentence names the venue with its type and food (and, half of the time, its
    area and landmark); the remaining slots follow as short sentences in MR order. Wording
    varies, order does not: a fixed order lets a 2-layer model learn the task in ~300 steps
    (a random sentence order made it repeat and drop slots far longer).
    """
    mr = dict(pairs)
    kind = mr.get("eatType", "place")
    if "food" in mr:
        kind = rng.choice([f"{mr['food']} {kind}", f"{kind} serving {mr['food']} food"])
    rest = [s for s in ("priceRange", "customer rating", "area", "familyFriendly", "near")
            if s in mr]
    where = ""
    if rng.random() < 0.5:
        where = (f" in the {mr['area']} area" if "area" in mr else "") + (
            f" near {mr['near']}" if "near" in mr else "")
        rest = [s for s in rest if s not in ("area", "near")]
    opener = rng.choice([
        f"{mr['name']} is {_a(kind)}{where}.",
        f"There is {_a(kind)} called {mr['name']}{where}.",
    ])
    return " ".join([opener, *(_sentence(s, mr[s], rng) for s in rest)])


def references(pairs: list[tuple[str, str]], n: int, seed: int) -> tuple[str, ...]:
    """`n` distinct references for an MR (fewer only if the templates allow fewer)."""
    rng = random.Random(f"{seed}|{linearize_slots(pairs)}")
    refs: list[str] = []
    for _ in range(20 * n):
        ref = realize(pairs, rng)
        if ref not in refs:
            refs.append(ref)
        if len(refs) == n:
            break
    return tuple(refs)


def sample_sources(n: int, rng: random.Random, taken: set[str]) -> list[list[tuple[str, str]]]:
    """`n` MRs whose linearized sources are new (not in `taken`); adds them to `taken`."""
    mrs = []
    while len(mrs) < n:
        pairs = sample_mr(rng)
        source = linearize_slots(pairs)
        if source not in taken:
            taken.add(source)
            mrs.append(pairs)
    return mrs


def synthetic_task(
    n_train: int = 500, n_valid: int = 50, n_test: int = 50,
    refs_per_source: int = 3, seed: int = 0,
) -> TaskData:
    """The synthetic task: `n_*` distinct MRs per split, `refs_per_source` references each.

    No MR is in two splits. The test split is drawn first, so it depends only on
    ``(seed, n_test)`` and stays fixed while `n_train` varies.
    """
    taken: set[str] = set()
    splits = {}
    for split, n in (("test", n_test), ("valid", n_valid), ("train", n_train)):
        rng = random.Random(seed * 1_000_003 + SPLIT_IDS[split])
        splits[split] = [(linearize_slots(p), references(p, refs_per_source, seed))
                         for p in sample_sources(n, rng, taken)]
    return TaskData(
        name="synthetic",
        train=[Example(s, r) for s, refs in splits["train"] for r in refs],
        valid=[Example(s, r) for s, refs in splits["valid"] for r in refs],
        test=[TestSource(s, refs) for s, refs in splits["test"]],
    )



def descriptions(n: int, seed: int = 0, max_per_venue: int = 3) -> list[str]:
    """`n` documents of restaurant descriptions without their MRs: text of the task's domain.

    A document describes one random venue 1..`max_per_venue` times, each time with freshly
    drawn templates (`realize`), as a web page may say the same facts twice; a model learns
    there to repeat names and values seen earlier in its context. The generator is seeded
    apart from the task's (``("descriptions", seed)``), and no MR is written out: the text
    teaches a base model the domain's language, never the mapping from an MR to its text
    that the task trains. The pretraining text of `lora_repro.synthetic_base`.
    """
    rng = random.Random(f"descriptions|{seed}")
    docs = []
    for _ in range(n):
        pairs = sample_mr(rng)
        docs.append(" ".join(realize(pairs, rng) for _ in range(rng.randint(1, max_per_venue))))
    return docs
