"""Text that the project writes into its UTF-8 files (JSON, CSV, logs) and reads back: file names and CSV cells.

A file system may hold names that are not valid UTF-8 (old archives: `latin1_\\xe9.png`); Python hands them over
with each undecodable byte as a surrogate escape (PEP 383), which no UTF-8 file can hold. They are written with
those bytes as `\\xNN`, the escape `bytes.decode(errors="backslashreplace")` gives, and `path_from_text` maps
such a name back to the file. Valid names are written as they are.

A CSV cell that a spreadsheet would evaluate as a formula (one that begins with `=`, `+`, `-`, `@`, a tab or a
carriage return) is written behind an apostrophe, the usual escape, which spreadsheets show as text;
`from_csv_cell` removes it again, so `from_csv_cell(to_csv_cell(x)) == x` for every text.
"""
import os
import re
from pathlib import Path

_FORMULA = re.compile(r"'*[=+\-@\t\r]")  # a formula start, after any apostrophes: escaped on writing
_ESCAPED_FORMULA = re.compile(r"'+[=+\-@\t\r]")  # what the escape gives: removed on reading
_BYTE_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def printable_name(name: str) -> str:
    """`name` as UTF-8 text: a file system's undecodable bytes (surrogate escapes) become `\\xNN`."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def path_from_text(text: str) -> str:
    """The file name that `printable_name` wrote as `text`: each `\\xNN` back to its byte."""
    parts = _BYTE_ESCAPE.split(text)  # text, hex, text, hex, ..., text
    raw = b"".join(bytes([int(part, 16)]) if i % 2 else part.encode("utf-8") for i, part in enumerate(parts))
    return os.fsdecode(raw)


def existing_path(path: Path) -> Path:
    """`path`, or the file it names with `\\xNN` escapes (as `printable_name` wrote it) when only that exists."""
    if "\\x" not in str(path) or os.path.lexists(path):
        return path
    unescaped = Path(path_from_text(str(path)))
    return unescaped if os.path.lexists(unescaped) else path


def to_csv_cell(text: str) -> str:
    """A text cell as written into the project's CSV files: printable, and never a spreadsheet formula."""
    text = printable_name(text)
    return "'" + text if _FORMULA.match(text) else text


def from_csv_cell(cell: str) -> str:
    """The text that `to_csv_cell` wrote as `cell`."""
    return cell[1:] if _ESCAPED_FORMULA.match(cell) else cell
