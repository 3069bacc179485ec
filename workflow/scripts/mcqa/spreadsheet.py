"""Read the question spreadsheets (xlsx or csv) and normalise their cells.

Every change made to a cell is counted by kind, and every row that cannot
be used is described by file, column and row, so nothing is lost silently.
"""

from __future__ import annotations

import datetime
import math
import re
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ARTICLE = "文章"
QUESTION = "問題"
OPTIONS = ("選項1", "選項2", "選項3", "選項4")
LABEL = "正確答案"
TRAIN_ID = "ID"
TEST_ID = "題號"

TRAIN_COLUMNS = (ARTICLE, QUESTION, *OPTIONS, LABEL)
TEST_COLUMNS = (TEST_ID, ARTICLE, QUESTION, *OPTIONS)
HEADER_ROWS = 1  # spreadsheet row of the first record = index + HEADER_ROWS + 1


class InputError(Exception):
    """Bad input that the user must fix; the message is meant for people."""


def place(sheet: str | None, row: int) -> str:
    """Where a row is, as a person finds it: its sheet (when a workbook has several) and its row number."""
    return (f"sheet {sheet!r} " if sheet is not None else "") + f"row {row}"


@dataclass
class Problem:
    """A cell that makes its row unusable: where, and why."""

    row: int  # spreadsheet row number (1 = header)
    row_id: str | None
    column: str
    message: str
    sheet: str | None = None  # set when questions come from several sheets

    @property
    def where(self) -> str:
        return place(self.sheet, self.row) + (f" (ID {self.row_id})" if self.row_id is not None else "")

    def describe(self) -> str:
        return f"{self.where}, column {self.column}: {self.message}"


@dataclass
class Row:
    row: int
    row_id: str | None
    article: str
    question: str
    options: list[str]
    label: int | None
    sheet: str | None = None

    @property
    def where(self) -> str:
        return place(self.sheet, self.row)


@dataclass
class SheetRow:
    """One data row of a spreadsheet: its cells by column name, and where it is."""

    sheet: str | None
    row: int
    cells: dict[str, object]


@dataclass
class ReadResult:
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fixed_rows: dict[str, list[str]] = field(default_factory=dict)  # kind of fix -> where it was made
    rows_read: int = 0
    sheets_read: list[str] = field(default_factory=list)
    sheets_left_out: list[str] = field(default_factory=list)  # sheets without the required columns

    def fix(self, kind: str, where: str) -> None:
        self.fixed_rows.setdefault(kind, []).append(where)

    @property
    def fixes(self) -> dict[str, int]:
        return {kind: len(where) for kind, where in sorted(self.fixed_rows.items())}


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip()
    )


def cell_text(value) -> str:
    """A cell as the text a person sees: 2013 -> '2013' (never '2013.0'), 0.5 -> '0.5'."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (pd.Timestamp, datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return str(value).strip()


def normalise_label(value) -> tuple[int | None, str | None]:
    """(label 1-4 or None if invalid, kind of fix applied or None)."""
    if isinstance(value, bool) or is_missing(value):
        return None, None
    if isinstance(value, int):
        return (value, None) if 1 <= value <= 4 else (None, None)
    if isinstance(value, float):
        if value.is_integer() and 1 <= value <= 4:
            return int(value), "label_number_as_float"
        return None, None
    raw = str(value)
    text = unicodedata.normalize("NFKC", raw)
    kind = "label_full_width" if text != raw else None
    text = text.strip()
    if text.startswith("選項"):
        text = text[len("選項"):].strip()
        kind = "label_option_prefix"
    try:
        number = float(text)
    except ValueError:
        return None, None
    if not number.is_integer() or not 1 <= number <= 4:
        return None, None
    if kind is None:
        kind = "label_as_text" if re.fullmatch(r"[1-4]", text) else "label_number_as_float_text"
    return int(number), kind


@dataclass(frozen=True)
class Formula:
    """A cell holding a formula whose value was never saved (the file was written by a program, not Excel)."""

    text: str


def header_of(sheet) -> list[str]:
    first = next(sheet.iter_rows(max_row=1, values_only=True), ())
    return [str(c).strip() if c is not None else "" for c in first]


def shown_number(value, number_format: str):
    """A whole number as Excel shows it under a zero-padded format ('00000': 123 -> '00123'), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and \
            re.fullmatch(r"0{2,}", number_format or ""):
        return f"{int(value):0{len(number_format)}d}"
    return None


def read_sheet(sheet, name: str | None, result: ReadResult) -> list[SheetRow]:
    """The data rows of a worksheet, each cell as the sheet shows it.

    A merged range (an article spanning its questions' rows, as exam sheets
    are laid out) gives every row of the range its top-left value, and a whole
    number under a zero-padded format keeps its zeros (an id 123 shown as
    00123 is 00123); both are counted as fixes.
    """
    header = header_of(sheet)
    grid = []
    for cells in sheet.iter_rows():
        values = []
        for cell in cells:
            shown = shown_number(cell.value, getattr(cell, "number_format", "General")) if cell.row > 1 else None
            if shown is not None and shown != cell_text(cell.value):
                result.fix("number_shown_with_zeros", f"{place(name, cell.row)} column {header[cell.column - 1]}")
            values.append(cell.value if shown is None else shown)
        grid.append(values)
    for merged in sheet.merged_cells.ranges:
        if merged.max_row < 2 or merged.max_row == merged.min_row:
            continue  # a merged header, or cells merged within one row: nothing to give other rows
        top = grid[merged.min_row - 1][merged.min_col - 1]
        for r in range(max(merged.min_row, 2), merged.max_row + 1):
            grid[r - 1][merged.min_col - 1: merged.max_col] = [top] * (merged.max_col - merged.min_col + 1)
        spanned = ", ".join(header[c - 1] for c in range(merged.min_col, min(merged.max_col, len(header)) + 1))
        result.fix("merged_cells_filled", f"{place(name, merged.min_row)}-{merged.max_row} column {spanned}")
    columns = {column: i for i, column in enumerate(header) if column}
    rows = []
    for r, values in enumerate(grid[1:], start=2):
        cells = {column: values[i] if i < len(values) else None for column, i in columns.items()}
        if not all(is_missing(v) for v in cells.values()):
            rows.append(SheetRow(name, r, cells))
    return rows


def sheet_hint(names: list[str], holding: list[str]) -> str:
    """Which sheets a workbook has, and which of them hold the required columns."""
    hint = f" The workbook has the sheets {', '.join(repr(n) for n in names)}"
    return hint + (f"; {', '.join(repr(n) for n in holding)} have the columns." if holding else
                   "; none has these columns in its first row.")


def read_workbook(path: Path, required: tuple[str, ...], result: ReadResult) -> list[SheetRow]:
    """The data rows of every sheet whose first row holds the required columns, in workbook order.

    Sheets without them (notes, instructions) are listed in result.sheets_left_out.
    """
    import openpyxl

    workbook = openpyxl.load_workbook(path, data_only=True)  # not read-only: merged ranges, number formats
    try:
        names = workbook.sheetnames
        holding = [ws for ws in workbook.worksheets if set(required) <= set(header_of(ws))]
        if not holding:
            header = header_of(workbook.worksheets[0])
            missing = [c for c in required if c not in header]
            raise InputError(
                f"{path}: missing column(s) {', '.join(missing)}. Found columns: {', '.join(filter(None, header))}. "
                f"The first row must hold the column names {', '.join(required)}." + sheet_hint(names, []))
        result.sheets_read = [ws.title for ws in holding]
        result.sheets_left_out = [n for n in names if n not in result.sheets_read]
        several = len(holding) > 1
        rows = [row for ws in holding for row in read_sheet(ws, ws.title if several else None, result)]
    finally:
        workbook.close()
    if not rows:
        raise InputError(f"{path}: the sheet has no data rows under its header. Fill it or point the config at "
                         "another file." + sheet_hint(names, result.sheets_read))
    mark_formulas(path, rows, tuple(c for c in required if c != TEST_ID))
    return rows


def mark_formulas(path: Path, rows: list[SheetRow], columns: tuple[str, ...]) -> None:
    """Put a Formula in each empty cell of `columns` that holds a formula with no saved value.

    Read for its value, such a cell is empty; without this it would become an
    empty option or an 'empty article' and the real cause would stay hidden.
    Only files with empty cells pay for the second read.
    """
    empty = [(row, column) for row in rows for column in columns if is_missing(row.cells[column])]
    if not empty:
        return
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True, data_only=False)
    try:
        formulas = {}
        for sheet in workbook.worksheets:
            header = header_of(sheet)
            for r, values in enumerate(sheet.iter_rows(min_row=2, values_only=True), start=2):
                for i, value in enumerate(values):
                    if isinstance(value, str) and value.startswith("=") and i < len(header):
                        formulas[(sheet.title, r, header[i])] = value
    finally:
        workbook.close()
    first = workbook.sheetnames[0]
    for row, column in empty:
        if (text := formulas.get((row.sheet or first, row.row, column))) is not None:
            row.cells[column] = Formula(text)


def read_table(path: str | Path, required: tuple[str, ...], result: ReadResult, label: str = LABEL) -> list[SheetRow]:
    """The data rows of a spreadsheet (xlsx: every sheet with the required columns; csv), each cell keeping
    its own type and the text it shows ('NA', 'None' and 'N/A' stay text); fail clearly on anything else.
    `label` is the answer column's name in the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found. Set data.train / data.test in config.yaml to an existing file.")
    try:
        if path.suffix.lower() != ".csv":
            return read_workbook(path, required, result)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(
            f"{path}: could not be read as a spreadsheet ({type(exc).__name__}: {exc}). "
            "Save it from Excel as .xlsx (or as UTF-8 .csv) and point the config at that file."
        ) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}. Found columns: {', '.join(frame.columns)}. "
            f"The first row must hold the column names {', '.join(required)}."
        )
    # CSV has no cell types: a plain digit label is what an xlsx int is.
    if label in frame.columns:
        frame[label] = frame[label].map(lambda v: int(v) if isinstance(v, str) and re.fullmatch(r"[1-4]", v) else v)
    rows = [SheetRow(None, int(index) + HEADER_ROWS + 1, dict(cells))
            for index, cells in frame.iterrows() if not all(is_missing(cells[c]) for c in frame.columns)]
    if not rows:
        raise InputError(f"{path}: the sheet has no data rows under its header. Fill it or point the config at "
                         "another file.")
    return rows


FORMULA_HELP = "open the file in Excel or LibreOffice and save it (that stores the values), or paste the values in"


def read_questions(path: str | Path, labelled: bool, columns: dict[str, str] | None = None) -> ReadResult:
    """Read a train (labelled) or test file into normalised rows and a list of problems.

    A test question is answered even with an empty article or question (it is
    counted as a fix); what makes it unusable is its id (empty, holding a
    line break, or used twice) or a formula cell with no saved value.
    `columns` names the file's own column for any of ours (文章: context); problems name the file's.
    """
    result = ReadResult()
    names = {column: (columns or {}).get(column, column) for column in (TRAIN_ID, *TRAIN_COLUMNS, TEST_ID)}
    required = TRAIN_COLUMNS if labelled else TEST_COLUMNS
    try:
        table = read_table(path, tuple(names[c] for c in required), result, label=names[LABEL])
    except InputError as exc:
        if not columns or "missing column" not in str(exc):
            raise
        mapped = ", ".join(f"{ours}: {theirs}" for ours, theirs in columns.items())
        raise InputError(f"{exc} The names it looks for come from the source's `columns` mapping in data.extra "
                         f"({mapped}): if the file is right, fix the mapping.") from None
    id_column = TRAIN_ID if labelled else TEST_ID
    result.rows_read = len(table)

    def problem(row: int, row_id: str | None, column: str, message: str, sheet: str | None) -> Problem:
        return Problem(row, row_id, names.get(column, column), message, sheet)  # the file's name of the column

    for sheet_row in table:
        cells = {ours: sheet_row.cells.get(theirs) for ours, theirs in names.items()}
        row, sheet = sheet_row.row, sheet_row.sheet
        raw_id = cells.get(id_column)
        row_id = None if is_missing(raw_id) else cell_text(raw_id)
        where = Problem(row, row_id, "", "", sheet).where
        problems: list[Problem] = []
        if not labelled and row_id is None:
            problems.append(problem(row, None, TEST_ID, "the question id is empty; every test question needs its 題號",
                                    sheet))
        elif not labelled and re.search(r"[\r\n]", row_id):
            problems.append(problem(row, row_id.replace("\n", "\\n"), TEST_ID,
                                    "the id holds a line break; remove it so the submission has one id per line", sheet))
        cell_columns = (ARTICLE, QUESTION, *OPTIONS, *((LABEL,) if labelled else ()))
        for column in cell_columns:
            if isinstance(cells[column], Formula):
                problems.append(problem(row, row_id, column, f"holds the formula {cells[column].text} with no saved "
                                                             f"value; {FORMULA_HELP}", sheet))
        texts = {}
        for column, kind in ((ARTICLE, "article_missing"), (QUESTION, "question_missing")):
            if isinstance(cells[column], Formula):
                continue
            if not is_missing(cells[column]):
                texts[column] = cell_text(cells[column])
            elif labelled:
                problems.append(problem(row, row_id, column, "is empty", sheet))
            else:  # still answerable from the question and options; counted, never dropped
                texts[column] = ""
                result.fix(kind, where)
        options = []
        for column in OPTIONS:
            if isinstance(cells[column], Formula):
                options.append("")
            elif is_missing(cells[column]):
                options.append("")
                result.fix("option_missing", f"{where} {column}")
            else:
                options.append(cell_text(cells[column]))
        label = None
        if labelled and not isinstance(cells[LABEL], Formula):
            label, kind = normalise_label(cells[LABEL])
            if label is None:
                problems.append(problem(row, row_id, LABEL, f"{cells[LABEL]!r} is not an answer 1-4 (also accepted: "
                                                            "'選項3', '３', '4.0')", sheet))
            elif kind:
                result.fix(kind, where)
        if problems:
            result.problems.extend(problems)
            continue
        result.rows.append(Row(row, row_id, texts[ARTICLE], texts[QUESTION], options, label, sheet))
    if not labelled:
        seen: dict[str, Row] = {}
        for r in result.rows:
            if r.row_id in seen:
                result.problems.append(problem(r.row, r.row_id, TEST_ID, f"duplicate id, first used in "
                                               f"{seen[r.row_id].where}; ids must be unique", r.sheet))
            else:
                seen[r.row_id] = r
        bad_rows = {(p.sheet, p.row) for p in result.problems}
        result.rows = [r for r in result.rows if (r.sheet, r.row) not in bad_rows]
    return result


def duplicate_rows(rows: list[Row]) -> dict:
    """Rows repeating an earlier row's article, question and options: how many, where, and how many disagree on the label."""
    first: dict[tuple, Row] = {}
    where, other_label = [], 0
    for r in rows:
        key = (r.article, r.question, tuple(r.options))
        if key in first:
            where.append(f"{r.where} repeats {first[key].where}")
            other_label += r.label != first[key].label
        else:
            first[key] = r
    return {"rows": len(where), "with_another_label": other_label, "where": where}
