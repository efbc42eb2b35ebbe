"""Helpers the benchmark scripts share: each owns sections of `docs/benchmarks.md`, delimited
by its own HTML-comment markers, and rewrites only those; every file they write is written whole
or not at all (`write_atomic`), so a part stopped by its time limit leaves no truncated file."""
import os
from pathlib import Path


def write_atomic(path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_section(path: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between the markers `begin` and `end` of the markdown file `path` by
    `body`, or append the marked section where the markers are missing (creating the file)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_atomic(path, text)
