"""CSV cells a spreadsheet will not run: the one rule every CSV wsi-her2 writes goes through.

A spreadsheet reads a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula (and tab or
carriage return can hide such a start), so a slide named ``=HYPERLINK("http://...").svs`` would
become a live link in ``slides.csv``. Following OWASP's advice on CSV injection, a *text* cell
starting with one of these characters is written with a single quote in front
(``'=HYPERLINK(...)``), which spreadsheets show as plain text.

Numbers are never changed: a value the project writes as a number (``-0.5``, ``+1``, ``1e-3``),
or a cell read back from one of the project's own tables that spells a plain decimal number, is
left as it is, so numeric columns stay numeric. The quote is added once: a neutralised cell starts
with ``'`` and is left alone on the next rewrite, and the project compares keys (slide ids) in
their written form (:func:`safe_cell` of the id).
"""
from __future__ import annotations

import re
from numbers import Number

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def safe_cell(value: object) -> object:
    """``value`` as a CSV cell a spreadsheet shows as written: text starting with ``= + - @``, tab
    or carriage return gets a leading ``'``; numbers (and text spelling a plain number) are kept."""
    if value is None or isinstance(value, Number):
        return value
    text = value if isinstance(value, str) else str(value)  # a path, say: written as its text
    if text.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def safe_row(values) -> list:
    """:func:`safe_cell` of every value of a row (a sequence)."""
    return [safe_cell(v) for v in values]


def safe_dict_row(row: dict) -> dict:
    """:func:`safe_cell` of every value of a ``csv.DictWriter`` row."""
    return {k: safe_cell(v) for k, v in row.items()}


def written_row(row: dict, columns) -> tuple[str, ...]:
    """The cells of ``row`` as a CSV writer writes them (``''`` for a missing value), neutralised:
    what reading the row back gives, to compare a table with the record it was written from."""
    return tuple("" if row.get(c) is None else str(safe_cell(row.get(c))) for c in columns)
