"""Data recipe of the bundled default model: the public-domain King James Bible as JSONL, one chapter per document.

Source: Debian's `bible-kjv` package (`apt-get install -y bible-kjv`; its `bible` program prints the text). Run:

    python3 recipes/make_kjv_corpus.py OUT.jsonl

Each record is {"text": "<Book> <chapter>\n\n1 <verse text>\n2 <verse text>\n..."}: 66 books, 1189 chapters,
31102 verses (about 4.4 MB of text).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
    "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
    "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
]
VERSE = re.compile(r"^(\S*?)(\d+):(\d+) (.*)$")


def main(out: str) -> int:
    if shutil.which("bible") is None:
        print("the `bible` program is missing: apt-get install -y bible-kjv", file=sys.stderr)
        return 1
    raw = subprocess.run(["bible", "-f", "Ge1:1-Re22:21"], capture_output=True, text=True, check=True).stdout
    chapters: list[tuple[str, str, list[str]]] = []
    book_idx, prev_abbr = -1, None
    for line in raw.splitlines():
        m = VERSE.match(line.strip())
        if not m:
            continue
        abbr, chap, verse, text = m.groups()
        if abbr != prev_abbr:
            book_idx, prev_abbr = book_idx + 1, abbr
        if not chapters or chapters[-1][0] != BOOKS[book_idx] or chapters[-1][1] != chap:
            chapters.append((BOOKS[book_idx], chap, []))
        chapters[-1][2].append(f"{verse} {text}")
    assert book_idx == 65, f"expected 66 books, parsed {book_idx + 1}"
    with Path(out).open("w") as f:
        for book, chap, verses in chapters:
            f.write(json.dumps({"text": f"{book} {chap}\n\n" + "\n".join(verses) + "\n"}) + "\n")
    print(f"{len(chapters)} chapters, {sum(len(v) for _, _, v in chapters)} verses -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "kjv.jsonl"))
