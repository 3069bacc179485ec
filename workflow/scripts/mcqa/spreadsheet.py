"""Read the question spreadsheets (xlsx or csv) and normalise their cells.

Every change made to a cell is counted by kind, and every row that cannot
be used is described by file, column and row, so nothing is lost silently.
"""

from __future__ import annotations

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


@dataclass
class Problem:
    row: int  # spreadsheet row number (1 = header)
    row_id: str | None
    column: str
    message: str

    def describe(self) -> str:
        where = f"row {self.row}" + (f" (ID {self.row_id})" if self.row_id is not None else "")
        return f"{where}, column {self.column}: {self.message}"


@dataclass
class Row:
    row: int
    row_id: str | None
    article: str
    question: str
    options: list[str]
    label: int | None


@dataclass
class ReadResult:
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fixed_rows: dict[str, list[str]] = field(default_factory=dict)  # kind of fix -> where it was made
    rows_read: int = 0

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
    if isinstance(value, pd.Timestamp):
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


def sheet_hint(path: Path, required: tuple[str, ...]) -> str:
    """Which sheets a workbook has, and which of them holds the required columns."""
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True)
    try:
        names = workbook.sheetnames
        holding = [name for name in names[1:]
                   if set(required) <= {str(c).strip() for c in next(workbook[name].iter_rows(max_row=1, values_only=True), ())}]
    finally:
        workbook.close()
    hint = f" The workbook has the sheets {', '.join(repr(n) for n in names)}; only the first is read."
    if holding:
        hint += f" Sheet {holding[0]!r} has the columns: move it to the front in Excel, or save it as its own file."
    return hint


def mark_formulas(path: Path, frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """Put a Formula in each empty cell of `columns` that holds a formula with no saved value.

    pandas reads such a cell as empty; without this it would become an empty
    option or an 'empty article' and the real cause would stay hidden. Only
    files with empty cells pay for the second read.
    """
    empty = [(index, column) for column in columns for index in frame.index[frame[column].isna()]]
    if not empty:
        return
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True, data_only=False)
    try:
        rows = list(workbook.worksheets[0].iter_rows(values_only=True))
    finally:
        workbook.close()
    header = [str(c).strip() for c in rows[0]]
    for index, column in empty:
        value = rows[int(index) + HEADER_ROWS][header.index(column)]
        if isinstance(value, str) and value.startswith("="):
            frame.at[index, column] = Formula(value)


def read_table(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Load a spreadsheet keeping each cell's own type; fail clearly on anything else."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found. Set data.train / data.test in config.yaml to an existing file.")
    is_csv = path.suffix.lower() == ".csv"
    try:
        if is_csv:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
            # CSV has no cell types: a plain digit label is what an xlsx int is.
            if LABEL in frame.columns:
                frame[LABEL] = frame[LABEL].map(lambda v: int(v) if isinstance(v, str) and re.fullmatch(r"[1-4]", v) else v)
        else:
            frame = pd.read_excel(path, dtype=object, engine="openpyxl")
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
            + ("" if is_csv else sheet_hint(path, required))
        )
    frame = frame.dropna(how="all")
    if frame.empty:
        raise InputError(f"{path}: the sheet has no data rows under its header. Fill it or point the config at another file."
                         + ("" if is_csv else sheet_hint(path, required)))
    if not is_csv:
        mark_formulas(path, frame, tuple(c for c in required if c != TEST_ID))
    return frame


FORMULA_HELP = "open the file in Excel or LibreOffice and save it (that stores the values), or paste the values in"


def read_questions(path: str | Path, labelled: bool) -> ReadResult:
    """Read a train (labelled) or test file into normalised rows and a list of problems.

    A test question is answered even with an empty article or question (it is
    counted as a fix); what makes it unusable is its id (empty, holding a
    line break, or used twice) or a formula cell with no saved value.
    """
    frame = read_table(path, TRAIN_COLUMNS if labelled else TEST_COLUMNS)
    id_column = TRAIN_ID if labelled else TEST_ID
    result = ReadResult(rows_read=len(frame))
    for index, cells in frame.iterrows():
        row = int(index) + HEADER_ROWS + 1
        raw_id = cells.get(id_column)
        row_id = None if is_missing(raw_id) else cell_text(raw_id)
        where = f"row {row}" + (f" (ID {row_id})" if row_id is not None else "")
        problems: list[Problem] = []
        if not labelled and row_id is None:
            problems.append(Problem(row, None, TEST_ID, "the question id is empty; every test question needs its 題號"))
        elif not labelled and re.search(r"[\r\n]", row_id):
            problems.append(Problem(row, row_id.replace("\n", "\\n"), TEST_ID,
                                    "the id holds a line break; remove it so the submission has one id per line"))
        cell_columns = (ARTICLE, QUESTION, *OPTIONS, *((LABEL,) if labelled else ()))
        for column in cell_columns:
            if isinstance(cells[column], Formula):
                problems.append(Problem(row, row_id, column, f"holds the formula {cells[column].text} with no saved "
                                                             f"value; {FORMULA_HELP}"))
        texts = {}
        for column, kind in ((ARTICLE, "article_missing"), (QUESTION, "question_missing")):
            if isinstance(cells[column], Formula):
                continue
            if not is_missing(cells[column]):
                texts[column] = cell_text(cells[column])
            elif labelled:
                problems.append(Problem(row, row_id, column, "is empty"))
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
                problems.append(
                    Problem(row, row_id, LABEL, f"{cells[LABEL]!r} is not an answer 1-4 (also accepted: '選項3', '３', '4.0')")
                )
            elif kind:
                result.fix(kind, where)
        if problems:
            result.problems.extend(problems)
            continue
        result.rows.append(Row(row, row_id, texts[ARTICLE], texts[QUESTION], options, label))
    if not labelled:
        seen: dict[str, int] = {}
        for r in result.rows:
            if r.row_id in seen:
                result.problems.append(
                    Problem(r.row, r.row_id, TEST_ID, f"duplicate id, first used in row {seen[r.row_id]}; ids must be unique")
                )
            else:
                seen[r.row_id] = r.row
        bad_rows = {p.row for p in result.problems}
        result.rows = [r for r in result.rows if r.row not in bad_rows]
    return result


def duplicate_rows(rows: list[Row]) -> dict:
    """Rows repeating an earlier row's article, question and options: how many, where, and how many disagree on the label."""
    first: dict[tuple, Row] = {}
    where, other_label = [], 0
    for r in rows:
        key = (r.article, r.question, tuple(r.options))
        if key in first:
            where.append(f"row {r.row} repeats row {first[key].row}")
            other_label += r.label != first[key].label
        else:
            first[key] = r
    return {"rows": len(where), "with_another_label": other_label, "where": where}
