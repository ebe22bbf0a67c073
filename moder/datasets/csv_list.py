"""A local dataset listed in two CSV files (source "csv").

Layout under root:

    root/train.csv      header `path,label`, then at least one row; path relative to root, label a class name
    root/test.csv       the same
    root/classes.txt    optional: one class name per line, fixing the classes and their order
    root/<the paths the CSVs name>

Example train.csv:

    path,label
    images/0001.png,red circle
    images/0002.png,blue star

Without classes.txt the classes are the labels of train.csv, sorted by name. Either way a test
label that no train row has is refused: the model would be asked for a class it was never shown.
A path that is absolute, or that leaves root through `..` or a symlink, is refused naming its line.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from moder.datasets import DatasetFormatError, DatasetNotFound, ImageSplit, Split, inside_root

_HEADER = ["path", "label"]


def _rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, path, label) of every data row of one CSV file."""
    if not path.is_file():
        raise DatasetNotFound(
            f"csv: {path} not found; write it with the header `path,label` (see moder/datasets/csv_list.py)"
        )
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: spreadsheet exports start with a BOM
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None or [cell.strip() for cell in header] != _HEADER:
            raise DatasetFormatError(f"csv: {path} line 1 is {header!r}, expected the header `path,label`")
        for row in reader:
            if not row:
                continue
            if len(row) != 2 or not row[0] or not row[1]:
                raise DatasetFormatError(f"csv: {path} line {reader.line_num} is {row!r}, expected `path,label`")
            rows.append((reader.line_num, row[0], row[1]))
    if not rows:
        raise DatasetFormatError(f"csv: {path} has no rows after its header `path,label`")
    return rows


def _class_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates or not names:
        raise DatasetFormatError(
            f"csv: {path} must list each class once; "
            + (f"repeated: {', '.join(duplicates)}" if duplicates else "it is empty")
        )
    return names


def _check_labels(path: Path, rows: list[tuple[int, str, str]], allowed: set[str], why: str) -> None:
    for line, _, label in rows:
        if label not in allowed:
            raise DatasetFormatError(f"csv: {path} line {line}: class {label!r} {why}")


def load(root: Path, split: Split) -> ImageSplit:
    train_file, classes_file = root / "train.csv", root / "classes.txt"
    train_rows = _rows(train_file)
    train_labels = {label for _, _, label in train_rows}
    if classes_file.is_file():
        classes = _class_list(classes_file)
        _check_labels(train_file, train_rows, set(classes), f"is not in {classes_file}")
    else:
        classes = sorted(train_labels)
    split_file = root / f"{split}.csv"
    rows = train_rows
    if split == "test":
        rows = _rows(split_file)
        _check_labels(split_file, rows, train_labels, f"has no rows in {train_file}")
    paths = [inside_root(root, relative, "csv", f"named in {split_file} line {line}") for line, relative, _ in rows]
    for path, (line, _, _) in zip(paths, rows, strict=True):
        if not path.is_file():
            raise DatasetNotFound(f"csv: {path} (named in {split_file} line {line}) not found")
    counts = Counter(label for *_, label in rows)
    empty = [name for name in classes if not counts[name]]
    if empty:  # a class taught from nothing, or never tested: its accuracy would mean nothing
        raise DatasetFormatError(f"csv: {split_file} has no row of class(es) {', '.join(map(repr, empty[:5]))}")
    label_of = {name: i for i, name in enumerate(classes)}
    return ImageSplit([str(path) for path in paths], [label_of[label] for *_, label in rows], classes)
