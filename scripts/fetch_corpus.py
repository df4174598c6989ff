#!/usr/bin/env python3
"""Regenerates the built-in miniature's corpus, ``python/fusellm/data/corpus/``.

Three domains of real English text, taken from Debian packages (downloaded with
``apt-get download`` and unpacked with ``dpkg -x``; nothing is installed):

- ``bible``: the King James Version from ``bible-kjv-text`` (public domain). Its text is stored
  in the compressed format of the Bible Retrieval System, so the ``bible`` program of the
  ``bible-kjv`` package is run (unpacked, never installed) to print every verse;
- ``jargon``: the Jargon File 4.4.7 from ``jargon-text`` (public domain);
- ``python``: prose of the Python 3.11 documentation sources (``html/_sources/*.rst.txt``) from
  ``python3.11-doc`` (PSF License Agreement): reStructuredText markup is stripped, code, tables
  and index entries are dropped.

Each domain is cleaned, cut into documents (consecutive paragraphs or verses grouped to a few
hundred words), reduced to a deterministic subset (the documents with the smallest SHA-256 of
their text) and split into ``train`` / ``heldout`` the same way (every tenth document by hash
rank is held out). The output is one gzip'd JSON-lines file per domain (``DOMAIN.jsonl.gz``,
fields ``id``, ``domain``, ``split``, ``source``, ``text``; gzip written with a zero timestamp
so the bytes are reproducible), ``index.json`` (package versions, counts, hashes) and
``NOTICE.md`` (sources and licences, with the PSF licence text taken from the package).

Usage (Debian bookworm, network access to a Debian mirror)::

    python scripts/fetch_corpus.py                 # pinned package versions
    python scripts/fetch_corpus.py --latest        # whatever versions the mirror has now
    python scripts/fetch_corpus.py --workdir /tmp/corpus-dl --max-docs 1000
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "python" / "fusellm" / "data" / "corpus"

#: Debian package -> pinned version (bookworm). ``--latest`` downloads the candidate instead.
PACKAGES = {
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",
    "jargon-text": "4.4.7-4.1",
    "python3.11-doc": "3.11.2-6+deb12u7",
}
DOMAIN_PACKAGES = {
    "bible": "bible-kjv-text",
    "jargon": "jargon-text",
    "python": "python3.11-doc",
}
#: Documents are cut once they reach this many words (the last paragraph is not split).
DOC_WORDS = 220
#: Shorter documents (the end of a chapter, a file) are dropped.
MIN_DOC_WORDS = 60
#: One document in HELDOUT_EVERY (by hash rank) goes to the held-out split.
HELDOUT_EVERY = 10
#: Parts of the Python documentation that hold the most prose (change logs and the C API are
#: left out: they are lists of names and issue numbers more than prose).
PYTHON_DIRS = ("tutorial", "howto", "faq", "reference", "library", "using", "extending")
PYTHON_RELEASE = "3.11.2"


# --- download ------------------------------------------------------------------------------------


def download(package: str, version: str | None, workdir: Path) -> tuple[Path, str]:
    """Downloads one package with ``apt-get download`` and unpacks it; returns (dir, version)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = f"{package}={version}" if version else package
    for old in workdir.glob(f"{package}_*.deb"):
        old.unlink()
    subprocess.run(["apt-get", "download", "-q", spec], cwd=workdir, check=True)
    (deb,) = workdir.glob(f"{package}_*.deb")
    got = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    target = workdir / f"x_{package}"
    if not target.exists():
        subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    return target, got


# --- cleaning ------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """NFC, no control characters, single spaces."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def words(text: str) -> int:
    return len(text.split())


def is_prose(text: str, min_words: int = 8) -> bool:
    """Enough words, mostly letters (not a table, a list of names or a code fragment), no
    box-drawing characters (a text-mode table) and no U+FFFD (a decoding accident)."""
    if words(text) < min_words or re.search("[\u2500-\u257f\ufffd]", text):
        return False
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters >= 0.7 * len(visible)


def group(units: Iterable[tuple[str, str]], sep: str) -> Iterator[tuple[str, str]]:
    """Groups consecutive (source, text) units into documents of about DOC_WORDS words.

    A document never spans two groups of units whose sources differ in their part before
    ``#`` (a chapter, a file, the lexicon). Yields (source of the first unit, text)."""
    cur: list[str] = []
    first = ""
    key = None
    count = 0

    def done() -> Iterator[tuple[str, str]]:
        if cur and count >= MIN_DOC_WORDS:
            yield first, sep.join(cur)

    for source, text in units:
        k = source.split("#", 1)[0]
        if k != key:
            yield from done()
            cur, count, key, first = [], 0, k, source
        if not cur:
            first = source
        cur.append(text)
        count += words(text)
        if count >= DOC_WORDS:
            yield from done()
            cur, count = [], 0
    yield from done()


# bible ---


def bible_units(bible_bin: Path, data_dir: Path) -> Iterator[tuple[str, str]]:
    """One unit per verse (``Ge1:1 In the beginning ...``), grouped by chapter."""
    out = subprocess.run(
        [str(bible_bin), "-f", "-p", str(data_dir), "Gen1:1-Rev22:21"],
        check=True,
        capture_output=True,
    ).stdout.decode("ascii")
    n = 0
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        n += 1
        book, chapter, verse, text = m.groups()
        yield f"{book}{chapter}#{verse}", normalise(text)
    if n != 31102:
        raise SystemExit(f"expected the 31,102 verses of the KJV, got {n}")


# jargon ---


def jargon_units(path: Path) -> Iterator[tuple[str, str]]:
    """One unit per paragraph: of a lexicon entry (its first paragraph starts with a
    ``term: pron. n.`` line) or of the chapters and appendices (a section heading, a line in the
    first column, starts a new group). ``{cross references}`` lose their braces."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"Chapter\s1\.", line))
    section = 0
    paragraphs: list[tuple[int, str]] = []
    cur: list[str] = []
    for line in [*lines[start:], ""]:
        s = line.strip()
        heading = bool(s) and not line[0].isspace()
        if not s or heading or set(s) <= set("═─-="):
            if cur:
                paragraphs.append((section, " ".join(cur)))
                cur = []
            section += heading
            continue
        cur.append(s)
    head = ""  # the headword line waiting for the entry's first paragraph
    entry_section = -1  # the section of the current lexicon entry (-1: not in an entry)
    for sec, p in paragraphs:
        p = normalise(p.replace("{", "").replace("}", ""))
        m = re.match(r"^:([^:]+(?::[^:\s][^:]*)*):\s*(.*)$", p)
        if m and words(p) <= 12:
            term, rest = m.groups()
            head = f"{term}: {rest}".strip() if rest else f"{term}:"
            entry_section = sec
            continue
        if sec == entry_section:
            if words(p) < 3:
                continue  # the letter dividers of the lexicon
            if not is_prose(p, min_words=3):
                continue
            yield "lexicon#", f"{head}\n{p}" if head else p
            head = ""
        elif is_prose(p):
            yield f"section{sec}#", p


# python ---

_KEEP_CONTENT = {
    "note",
    "warning",
    "seealso",
    "versionadded",
    "versionchanged",
    "deprecated",
    "deprecated-removed",
    "function",
    "method",
    "class",
    "attribute",
    "data",
    "exception",
    "decorator",
    "decoratormethod",
    "classmethod",
    "staticmethod",
    "abstractmethod",
    "coroutinefunction",
    "coroutinemethod",
    "describe",
    "impl-detail",
    "tip",
    "important",
    "attention",
    "caution",
    "admonition",
    "option",
    "cmdoption",
    "envvar",
    "opcode",
    "pdbcommand",
    "glossary",
    "topic",
    "sidebar",
    "rubric",
}
_BULLET = re.compile(r"^([*+-]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
_TABLE = re.compile(r"^[=+|-][=+|\- ]*$")


def _role(m: re.Match[str]) -> str:
    role, text = m.group(1), m.group(2)
    if text.endswith(">") and "<" in text:
        return text[: text.rindex("<")].strip()
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    if role in ("pep", "rfc"):
        return f"{role.upper()} {text}"
    if role == "token":
        return text.rsplit(":", 1)[-1]
    return text


def rst_inline(s: str) -> str:
    """Strips reStructuredText inline markup, keeping the text."""
    s = s.replace("|version|", "3.11").replace("|release|", PYTHON_RELEASE).replace("\\ ", "")
    s = re.sub(r":(?:[\w+-]+:)?([\w+-]+):`([^`]*)`", _role, s)
    s = re.sub(r"``(.+?)``", r"\1", s)
    s = re.sub(r"`([^`<]*?)\s*<[^>`]*>`__?", r"\1", s)
    s = re.sub(r"`([^`]+)`_{0,2}", r"\1", s)
    s = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\s*\[(?:#\w*|\d+)\]_", "", s)
    s = re.sub(r"\|(\w[\w -]*)\|", r"\1", s)
    return s


def rst_paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of one reStructuredText file, markup stripped."""
    lines = [line.rstrip().expandtabs(8) for line in text.splitlines()]
    cur: list[str] = []
    cur_indent = 0
    bad = False
    in_list = False
    skip: int | None = None  # skip blank lines and lines indented more than this

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    def flush() -> Iterator[str]:
        nonlocal cur, bad
        para, cur = cur, []
        was_bad, bad = bad, False
        if not para or was_bad:
            return
        p = " ".join(para)
        if p.endswith(" ::"):
            p = p[:-3]  # "text ::" is rendered "text"
        elif p.endswith("::"):
            p = p[:-1]  # "text::" is rendered "text:"
        p = normalise(rst_inline(p))
        if p.startswith(">>>") or not is_prose(p):
            return
        yield p

    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if skip is not None:
            if not s or indent(line) > skip:
                i += 1
                continue
            skip = None
        if not s:
            ends_literal = bool(cur) and cur[-1].endswith("::")
            yield from flush()
            if ends_literal:
                skip = cur_indent
            i += 1
            continue
        ind = indent(line)
        if s.startswith(".."):
            ends_literal = bool(cur) and cur[-1].endswith("::")
            yield from flush()
            m = re.match(r"^\.\.\s+([\w:-]+)::", s)
            name = m.group(1).split(":")[-1] if m else ""
            i += 1
            if name in _KEEP_CONTENT:
                while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):
                    i += 1  # directive options
            else:
                skip = ind
            if ends_literal and skip is None:
                skip = cur_indent
            continue
        if len(s) >= 3 and len(set(s)) == 1 and not s[0].isalnum():
            cur, bad = [], False  # a title's underline (the title is dropped) or overline
            i += 1
            continue
        if (_TABLE.match(s) and " " in s) or s.startswith(("+-", "+=", "| ")):
            bad = True
        if _BULLET.match(s) and (not cur or (in_list and ind == cur_indent)):
            yield from flush()  # a list item (a wrapped line may start with "-" or "+")
            s = _BULLET.sub("", s)
            in_list = True
        elif not cur:
            in_list = False
        if not cur:
            cur_indent = ind
        cur.append(s)
        i += 1
    yield from flush()


def python_units(sources: Path) -> Iterator[tuple[str, str]]:
    """One unit per prose paragraph, grouped by file."""
    for sub in PYTHON_DIRS:
        for path in sorted((sources / sub).rglob("*.rst.txt")):
            rel = path.relative_to(sources).as_posix()
            text = path.read_text(encoding="utf-8")
            for j, p in enumerate(rst_paragraphs(text)):
                yield f"{rel}#{j}", p


def psf_licence(sources: Path) -> tuple[str, str]:
    """(copyright notice, PSF License Agreement text) from the documentation's own sources."""
    lic = (sources / "license.rst.txt").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lic) if line.startswith("PSF LICENSE AGREEMENT"))
    body: list[str] = []
    for line in lic[start + 2 :]:
        if line.strip().startswith(".. parsed-literal"):
            continue
        if line and not line.startswith(" "):
            break
        body.append(line)
    title = lic[start].replace("|release|", PYTHON_RELEASE)
    text = "\n".join(line[3:] if line.startswith("   ") else line for line in body).strip()
    text = title + "\n\n" + text.replace("|release|", PYTHON_RELEASE)
    paragraphs = (sources / "copyright.rst.txt").read_text(encoding="utf-8").split("\n\n")
    notice = "\n".join(
        normalise(p) + "  " for p in paragraphs if p.startswith("Copyright ©")
    ).rstrip()
    return notice, text


# --- selection and output ------------------------------------------------------------------------


def select(domain: str, docs: list[tuple[str, str]], max_docs: int) -> list[dict[str, str]]:
    """The max_docs documents with the smallest text hash, in corpus order, with their split."""
    keyed = [(hashlib.sha256(t.encode("utf-8")).hexdigest(), i) for i, (_, t) in enumerate(docs)]
    chosen = sorted(keyed)[:max_docs]
    heldout = {i for rank, (_, i) in enumerate(chosen) if rank % HELDOUT_EVERY == 0}
    rows = []
    for n, i in enumerate(sorted(i for _, i in chosen)):
        source, text = docs[i]
        rows.append(
            {
                "id": f"{domain}-{n:05d}",
                "domain": domain,
                "split": "heldout" if i in heldout else "train",
                "source": source.replace("#", ":") if domain == "bible" else source.split("#")[0],
                "text": text,
            }
        )
    return rows


def write_jsonl_gz(path: Path, rows: list[dict[str, str]]) -> bytes:
    raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw.encode("utf-8"))
    data = buf.getvalue()
    path.write_bytes(data)
    return data


NOTICE_TEMPLATE = """\
# Corpus of the built-in miniature: sources and licences

The files in this directory were generated by `scripts/fetch_corpus.py` from three Debian
(bookworm) packages. Each `DOMAIN.jsonl.gz` holds one JSON object per document (`id`, `domain`,
`split`, `source`, `text`); `index.json` lists counts and SHA-256 hashes.

| domain | Debian package | version | licence | documents (train / held-out) | words |
|---|---|---|---|---|---|
{table}

Changes made to the original texts (all domains): text extracted from the packaged files,
Unicode NFC-normalised, whitespace collapsed within paragraphs, the text cut into documents of
about {doc_words} words (consecutive verses, lexicon entries or paragraphs), and a deterministic
subset selected (smallest SHA-256 of the document text).

## bible: the King James Version (1611)

From `bible-kjv-text` {v_bible}, printed verse by verse with the `bible` program of
`bible-kjv` {v_bible_prog} (which is only run, not redistributed). The text of the King James
Version is in the public domain (its Debian copyright file: "The copyright for the King James
Version text of the Bible is expired since the translation was done in 1611"). Verse numbers and
references are removed from the text (a document's first verse is kept in `source`).

## jargon: The Jargon File, version 4.4.7

From `jargon-text` {v_jargon} (`jargon.txt.gz`), edited by Eric S. Raymond. The Jargon File is
in the public domain: "This document (the Jargon File) is in the public domain, to be freely
used, shared, and modified." As its authors ask, cite it as "The on-line hacker Jargon File,
version 4.4.7, 29 Dec 2003". Changes: the braces around cross references are removed, lexicon
headwords (`:term:`) are written as `term:` lines, the table of contents and glossary index are
dropped.

## python: the Python {py_release} documentation

From `python3.11-doc` {v_python} (`html/_sources/*.rst.txt` in the directories
{py_dirs}). Python's documentation is licensed under the PSF License
Agreement, reproduced below, with this copyright notice:

{py_notice}

Summary of the changes made (clause 3 of the licence): only prose paragraphs are kept;
reStructuredText markup (roles, literals, emphasis, links, directives' headers and options) is
stripped, keeping the text; section titles, code examples, literal blocks, doctests, tables,
index entries and comments are removed; paragraphs are unwrapped and grouped into documents.

```text
{psf}
```
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    ap.add_argument("--workdir", type=Path, default=None, help="download directory (default: temp)")
    ap.add_argument("--latest", action="store_true", help="do not pin the package versions")
    ap.add_argument("--max-docs", type=int, default=1000, help="documents per domain")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fusellm-corpus-") as tmp:
        work = args.workdir or Path(tmp)
        dirs: dict[str, Path] = {}
        versions: dict[str, str] = {}
        for pkg, pinned in PACKAGES.items():
            dirs[pkg], versions[pkg] = download(pkg, None if args.latest else pinned, work)
            print(f"{pkg} {versions[pkg]}", file=sys.stderr)
        sources = dirs["python3.11-doc"] / "usr/share/doc/python3.11/html/_sources"
        units = {
            "bible": bible_units(
                dirs["bible-kjv"] / "usr/bin/bible", dirs["bible-kjv-text"] / "usr/lib"
            ),
            "jargon": jargon_units(dirs["jargon-text"] / "usr/share/doc/jargon-text/jargon.txt.gz"),
            "python": python_units(sources),
        }
        seps = {"bible": " ", "jargon": "\n\n", "python": "\n\n"}
        args.out.mkdir(parents=True, exist_ok=True)
        index: dict[str, object] = {"generator": "scripts/fetch_corpus.py", "domains": {}}
        table = []
        for domain, it in units.items():
            docs = list(group(it, seps[domain]))
            rows = select(domain, docs, args.max_docs)
            data = write_jsonl_gz(args.out / f"{domain}.jsonl.gz", rows)
            pkg = DOMAIN_PACKAGES[domain]
            n_held = sum(r["split"] == "heldout" for r in rows)
            n_words = sum(words(r["text"]) for r in rows)
            index["domains"][domain] = {  # type: ignore[index]
                "file": f"{domain}.jsonl.gz",
                "package": pkg,
                "version": versions[pkg],
                "documents": len(rows),
                "train": len(rows) - n_held,
                "heldout": n_held,
                "words": n_words,
                "characters": sum(len(r["text"]) for r in rows),
                "candidates": len(docs),
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
            licence = {"bible": "public domain", "jargon": "public domain", "python": "PSF-2.0"}
            table.append(
                f"| {domain} | `{pkg}` | {versions[pkg]} | {licence[domain]} | "
                f"{len(rows) - n_held} / {n_held} | {n_words:,} |"
            )
            print(
                f"{domain}: {len(rows)} of {len(docs)} documents, {n_words:,} words, "
                f"{len(data):,} bytes",
                file=sys.stderr,
            )
        notice, psf = psf_licence(sources)
        (args.out / "index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (args.out / "NOTICE.md").write_text(
            NOTICE_TEMPLATE.format(
                table="\n".join(table),
                doc_words=DOC_WORDS,
                v_bible=versions["bible-kjv-text"],
                v_bible_prog=versions["bible-kjv"],
                v_jargon=versions["jargon-text"],
                v_python=versions["python3.11-doc"],
                py_release=PYTHON_RELEASE,
                py_dirs=", ".join(f"`{d}`" for d in PYTHON_DIRS),
                py_notice=notice,
                psf=psf,
            ),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
