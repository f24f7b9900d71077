"""Generate the synthetic NER demo sample shipped with the project.

Every sentence is built from templates and from name lists written for this
project (invented people and companies, common city and country names); no
real corpus is used. The output is deterministic for a given --seed.

Each entity list is split into a "train" pool and a "held-out" pool. Training
sentences only use the train pools; dev sentences draw each entity from the
held-out pool with probability --unseen-rate, so the dev set measures whether
the model recognises names it has never seen. A few templates are also kept
for dev only.

    python scripts/make_demo_data.py                       # -> assets/*.jsonl
    python scripts/make_demo_data.py --spacy-dir corpus/demo  # also .spacy

Output JSONL lines: {"text": "...", "entities": [[start, end, label], ...]}
(character offsets, end exclusive), each span aligned to spaCy's English
tokenizer (checked when the file is written).
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

FIRST_NAMES = """
Amara Bastian Celia Dario Elena Farid Greta Hugo Ingrid Jonas Kavya Lorenzo
Mireille Nikolai Odette Pavel Quinn Rosalind Soren Talia Ulrich Valeria Wendell
Ximena Yusuf Zelda Anders Beatrix Cormac Delphine Emeka Fiona Gideon Hana Idris
Jolene Kasimir Leona Magnus Nadia Osric Priya Rafael Saskia Tobias Una Viktor
Wilhelmina Yara Zoltan Adele Bram Carmen Desmond Esther Felix Gwen Hector Imani
Jasper Katrin Lucian Marisol Nils Ophelia Piotr Rhea Stellan Thea Uriel Vera
""".split()

LAST_NAMES = """
Abernathy Balogun Castellano Drummond Eklund Fairweather Gallardo Hargreaves
Ishikawa Jankowski Kowalczyk Lindqvist Marchetti Nakamura Okonkwo Pemberton
Quintero Rasmussen Sandoval Thornbury Underhill Valdivia Whitlock Yilmaz Zielinski
Ashdown Brannigan Cavendish Delacroix Esposito Fenwick Grunewald Halvorsen Iglesias
Jovanovic Kingsley Lachance Mbeki Novak Oyelaran Petrakis Quigley Rourke Silvestri
Tremblay Ulloa Vasquez Westergaard Yamamoto Zamora Albrecht Bellamy Crowther
Dunmore Everly Falconer Gostelow Hollis Ivanova Jepsen Kettering Lowell Moreau
Nyberg Ostrander Prescott
""".split()

ORG_STEMS = """
Norbridge Veltrix Calloway Ardent Bluefen Corvane Dunhaven Elmstead Fairlight
Granwick Halcyon Ironvale Juniper Kestrel Lumora Meridex Northgate Obsidian
Pinecrest Quorra Redwater Silverline Tamsin Umbrel Vantage Westmoor Xylem
Yarrow Zephyr Ambervale Brightwell Coldharbor Driftwood Evergreen Foxglove
Greystone Harbinger Indigo Jadeport Keystone Larkspur Mistral Nimbus Oakhurst
Parallax Quillon Rookwood Sablecrest Thistle Upland Verdant Wrenfield Axiom
Borealis Cobalt Dovetail Emberly Falkner Gilded Hollowell Ionic Kinsale
""".split()

ORG_SUFFIXES = [
    "Capital", "Systems", "Holdings", "Group", "Bank", "Energy", "Motors",
    "Pharmaceuticals", "Airlines", "Media", "Foods", "Technologies", "Partners",
    "Insurance", "Logistics", "Mining", "Telecom", "Labs", "Steel",
    "Chemicals", "Shipping", "Retail", "Construction", "Software", "Brewing",
]

ORG_FIXED = [
    # Institutions written as whole names (no suffix added).
    "the Ministry of Finance", "the Central Statistics Office", "the National Rail Authority",
    "the Federal Trade Council", "the Harbour Commission", "the Union of Dock Workers",
]

GPES = """
London Paris Berlin Madrid Lisbon Rome Vienna Prague Warsaw Budapest Athens
Stockholm Oslo Helsinki Copenhagen Dublin Amsterdam Brussels Geneva Zurich
Istanbul Cairo Nairobi Lagos Accra Johannesburg Casablanca Mumbai Delhi Karachi
Dhaka Jakarta Manila Bangkok Hanoi Seoul Tokyo Osaka Shanghai Beijing Sydney
Melbourne Auckland Toronto Montreal Vancouver Chicago Boston Denver Houston Miami
Seattle Atlanta Lima Bogota Santiago Quito Caracas Montevideo Brazil Canada Kenya
Norway Portugal Vietnam Chile Peru Ghana Morocco Egypt Poland Finland Austria
Valmora Kestrelby Drummore Ostrava Lindenfeld Carrow Belmarsh
""".split()
GPES_EXTRA = ["New Carrow", "San Aurelio", "Halden Falls", "Saint Maren", "East Vellmar",
              "Rio Claro", "Lake Tamsin", "North Ashby", "Essingvik"]

# Roles held in an organisation ({ROLE} ... of {ORG}) and in a place ({GPE_ROLE} of {GPE}).
ROLES = [
    "chief executive", "spokeswoman", "spokesman", "chairman", "analyst",
    "chief economist", "founder", "finance director", "head of research", "general counsel",
]
GPE_ROLES = [
    "mayor", "finance minister", "central bank governor", "trade envoy", "foreign minister",
    "police chief", "governor", "health minister",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# Slots: {PER} full person name, {PER2} another person, {LAST} last name of {PER}
# (second mention), {ORG}/{ORG2}, {GPE}/{GPE2}; {ROLE}, {GPE_ROLE}, {DAY}, {NUM},
# {PCT} are not entities.
TEMPLATES = [
    "{PER}, the {ROLE} of {ORG}, said on {DAY} that the company would cut {NUM} jobs in {GPE}.",
    "{ORG} shares rose {PCT} percent in {GPE} after {PER} announced a new strategy.",
    "Police in {GPE} arrested {NUM} people on {DAY}, a spokesman said.",
    "{PER} arrived in {GPE} on {DAY} for talks with {PER2}.",
    "{ORG} agreed to buy {ORG2} for {NUM} million dollars, the companies said.",
    "The {ROLE} of {ORG}, {PER}, resigned after {NUM} years in the job.",
    "\"We expect growth to slow,\" {PER} told reporters in {GPE}.",
    "{GPE} and {GPE2} signed a trade agreement on {DAY}.",
    "{ORG} reported a {PCT} percent rise in quarterly profit, beating forecasts.",
    "Officials from {ORG} will meet {PER} in {GPE} next week.",
    "{PER} won the final in {GPE}, beating {PER2} in straight sets.",
    "Heavy rain caused flooding across {GPE} on {DAY}, and {NUM} homes lost power.",
    "{PER} has been named {ROLE} of {ORG}, replacing {PER2}. {LAST} starts in {GPE} on {DAY}.",
    "Analysts at {ORG} cut their forecast for {GPE} to {PCT} percent.",
    "{ORG} opened a new office in {GPE}, its {NUM}th outside {GPE2}.",
    "According to {PER}, talks between {ORG} and {ORG2} broke down on {DAY}.",
    "The court in {GPE} fined {ORG} {NUM} million euros for breaking competition rules.",
    "{PER} of {ORG} said demand in {GPE} remained weak.",
    "Flights between {GPE} and {GPE2} were cancelled on {DAY} after a strike at {ORG}.",
    "{LAST_ONLY} scored twice as {GPE} beat {GPE2} {NUM} to one.",
    "A delegation led by {PER} left {GPE} for {GPE2} on {DAY}.",
    "{ORG} said it had hired {PER} as its new {ROLE}.",
    "Investors in {GPE} sold shares of {ORG} after the results.",
    "Prices rose {PCT} percent last month, the statistics office said on {DAY}.",
    "{PER}, who founded {ORG} in {GPE}, died on {DAY} aged {NUM}.",
    "The government of {GPE} appointed {PER} to lead the inquiry into {ORG}.",
    "{ORG} and {ORG2} will build a factory near {GPE}, {PER} said.",
    "Speaking in {GPE}, {PER} called for calm ahead of the vote.",
    "The {GPE_ROLE} of {GPE}, {PER}, said the budget would be published on {DAY}.",
    "{PER}, {GPE}'s {GPE_ROLE}, met union leaders from {ORG} on {DAY}.",
    "Voters in {GPE} go to the polls on {DAY}, and {PER} is expected to win.",
    # Held out: only used in the dev set.
    "In an interview, {PER} said {ORG} had no plans to leave {GPE}.",
    "{GPE} police said {PER} was questioned about payments from {ORG}.",
    "Ministers met in {GPE} on {DAY}; {PER}, the {GPE_ROLE} of {GPE2}, chaired the session.",
    "Earlier this year {ORG2} sued {ORG} in {GPE} over a patent.",
]
N_HELD_OUT_TEMPLATES = 4

NUMBER_WORDS = ["two", "three", "five", "seven", "ten", "twelve", "40", "120", "300", "1,500"]


def split_pool(items: List[str], rng: random.Random, held_out: float) -> Tuple[List[str], List[str]]:
    items = list(items)
    rng.shuffle(items)
    n = max(1, int(round(len(items) * held_out)))
    return items[n:], items[:n]


class Pools:
    def __init__(self, rng: random.Random, held_out: float) -> None:
        self.first = split_pool(FIRST_NAMES, rng, held_out)
        self.last = split_pool(LAST_NAMES, rng, held_out)
        self.org_stem = split_pool(ORG_STEMS, rng, held_out)
        self.org_fixed = split_pool(ORG_FIXED, rng, held_out)
        self.gpe_pool = split_pool(GPES + GPES_EXTRA, rng, held_out)

    def pick(self, rng: random.Random, pool: Tuple[List[str], List[str]], unseen: bool) -> str:
        return rng.choice(pool[1] if unseen else pool[0])

    def person(self, rng, unseen) -> Tuple[str, str]:
        first = self.pick(rng, self.first, unseen and rng.random() < 0.7)
        last = self.pick(rng, self.last, unseen)
        return f"{first} {last}", last

    def org(self, rng, unseen) -> str:
        if rng.random() < 0.08:
            return self.pick(rng, self.org_fixed, unseen)
        stem = self.pick(rng, self.org_stem, unseen)
        r = rng.random()
        if r < 0.15:
            return stem
        if r < 0.25:
            return f"{stem} {rng.choice(['&', 'and'])} {self.pick(rng, self.last, unseen)}"
        return f"{stem} {rng.choice(ORG_SUFFIXES)}"

    def gpe(self, rng, unseen) -> str:
        return self.pick(rng, self.gpe_pool, unseen)


SLOT_RE = re.compile(r"\{([A-Z_0-9]+)\}")


def fill(template: str, rng: random.Random, pools: Pools, unseen_rate: float):
    """Return (text, [(start, end, label)]) for one template."""
    values: Dict[str, Tuple[str, str]] = {}
    text_parts: List[str] = []
    ents: List[Tuple[int, int, str]] = []
    pos = 0
    offset = 0
    for m in SLOT_RE.finditer(template):
        text_parts.append(template[pos:m.start()])
        offset += m.start() - pos
        slot = m.group(1)
        unseen = rng.random() < unseen_rate
        label = None
        if slot in ("PER", "PER2"):
            while True:
                full, last = pools.person(rng, unseen)
                if all(full != v[0] for v in values.values()):
                    break
            values[slot] = (full, last)
            value, label = full, "PERSON"
        elif slot == "LAST":
            value, label = values["PER"][1], "PERSON"
        elif slot == "LAST_ONLY":
            value, label = pools.person(rng, unseen)[1], "PERSON"
        elif slot in ("ORG", "ORG2"):
            while True:
                value = pools.org(rng, unseen)
                if all(value != v[0] for v in values.values()):
                    break
            values[slot] = (value, "")
            label = "ORG"
        elif slot in ("GPE", "GPE2"):
            while True:
                value = pools.gpe(rng, unseen)
                if all(value != v[0] for v in values.values()):
                    break
            values[slot] = (value, "")
            label = "GPE"
        elif slot == "ROLE":
            value = rng.choice(ROLES)
        elif slot == "GPE_ROLE":
            value = rng.choice(GPE_ROLES)
        elif slot == "DAY":
            value = rng.choice(DAYS)
        elif slot == "NUM":
            value = rng.choice(NUMBER_WORDS)
        elif slot == "PCT":
            value = f"{rng.randint(1, 19)}.{rng.randint(0, 9)}"
        else:
            raise ValueError(f"Unknown slot {slot!r} in template {template!r}")
        if label is not None:
            start = offset
            # "the Ministry of Finance": keep "the" outside the entity.
            if value.startswith("the "):
                start += 4
            ents.append((start, offset + len(value), label))
        text_parts.append(value)
        offset += len(value)
        pos = m.end()
    text_parts.append(template[pos:])
    text = "".join(text_parts)
    if text[0].islower():  # a sentence-initial "the Ministry ..."
        text = text[0].upper() + text[1:]
    return text, ents


def generate(n_train: int, n_dev: int, seed: int, held_out: float, unseen_rate: float):
    rng = random.Random(seed)
    pools = Pools(rng, held_out)
    train_templates = TEMPLATES[:-N_HELD_OUT_TEMPLATES]
    train, dev, seen_texts = [], [], set()

    def make(templates, unseen_rate, n, out):
        while len(out) < n:
            text, ents = fill(rng.choice(templates), rng, pools, unseen_rate)
            if text in seen_texts:
                continue
            seen_texts.add(text)
            out.append({"text": text, "entities": [list(e) for e in ents]})

    make(train_templates, 0.0, n_train, train)
    make(TEMPLATES, unseen_rate, n_dev, dev)
    return train, dev


def check_alignment(records) -> None:
    import spacy

    nlp = spacy.blank("en")
    for rec in records:
        doc = nlp.make_doc(rec["text"])
        for start, end, label in rec["entities"]:
            if doc.char_span(start, end, label=label) is None:
                sys.exit(f"Entity {rec['text'][start:end]!r} does not align to tokens in: {rec['text']}")


def write_jsonl(records, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl-dir", type=Path, default=Path("assets"))
    p.add_argument("--spacy-dir", type=Path, default=None, help="also write train.spacy / dev.spacy here")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-dev", type=int, default=150)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--held-out", type=float, default=0.25, help="share of each name list kept out of training")
    p.add_argument("--unseen-rate", type=float, default=0.5, help="chance a dev entity comes from the held-out pool")
    args = p.parse_args()

    train, dev = generate(args.n_train, args.n_dev, args.seed, args.held_out, args.unseen_rate)
    check_alignment(train + dev)
    train_path = args.jsonl_dir / "demo_ner_train.jsonl"
    dev_path = args.jsonl_dir / "demo_ner_dev.jsonl"
    write_jsonl(train, train_path)
    write_jsonl(dev, dev_path)
    print(f"Wrote {len(train)} sentences to {train_path} and {len(dev)} to {dev_path}")

    train_names = {r["text"][s:e] for r in train for s, e, _ in r["entities"]}
    dev_ents = [r["text"][s:e] for r in dev for s, e, _ in r["entities"]]
    unseen = sum(1 for name in dev_ents if name not in train_names)
    print(f"Dev entities: {len(dev_ents)}, of which {unseen} ({100 * unseen / len(dev_ents):.0f} %) never occur in train")

    if args.spacy_dir is not None:
        from jsonl_to_spacy import convert  # same folder

        convert(train_path, args.spacy_dir / "train.spacy")
        convert(dev_path, args.spacy_dir / "dev.spacy")


if __name__ == "__main__":
    main()
