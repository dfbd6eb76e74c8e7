"""Training data: scikit-learn's bundled data sets, inline JSON arrays and
CSV or NPZ objects in storage, split deterministically and standardized."""

from __future__ import annotations

import csv
import difflib
import functools
import io
import numbers
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.npyio import NpzFile

from app.jsonsafe import format_shown_value
from app.settings import Settings
from app.storage import StorageError, storage_for

BUILTIN_DATASETS = ("digits", "iris", "wine", "breast_cancer")
# The keys of a bundled data set given as an object.
_SPLIT_KEYS = frozenset({"name", "seed", "test_fraction"})
# The keys of an object in storage and of an inline data set.
_STORED_KEYS = frozenset({"bucket", "path", "label_column"})
_INLINE_KEYS = frozenset({"X", "data", "y", "labels"})
DEFAULT_DATASET = "digits"
# Models compute in float32, so a larger feature value would become infinite.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Errors that numpy.load and reading an archive's members raise for bytes
# that are not a valid NPZ archive of plain (non-object) arrays.
_NPZ_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
# A ZIP archive starts with a local file header, or is empty (only the end
# record); numpy.load tests the same two signatures.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


class DatasetError(ValueError):
    """A data set that cannot be loaded or does not fit a classifier."""


@dataclass
class Dataset:
    """A standardized train/test split with labels numbered 0..classes-1."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    label_names: list[str]
    mean: np.ndarray
    std: np.ndarray

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])


@functools.cache
def _builtin(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }[name]
    bunch = loader()
    names = np.asarray(bunch.target_names)
    # Named classes (iris species, tumour kinds) keep their names in results.
    labels = names[bunch.target] if names.dtype.kind in "US" else bunch.target
    return np.asarray(bunch.data, dtype=np.float32), np.asarray(labels)


def clear_dataset_cache() -> int:
    """Drop the cached built-in data sets; return how many were cached."""
    count = _builtin.cache_info().currsize
    _builtin.cache_clear()
    return count


def is_stored(source: Any) -> bool:
    """Return whether `source` names an object in storage."""
    return isinstance(source, dict) and "bucket" in source


def describe_source(source: Any) -> str:
    """A short name of a data set source, for records and messages."""
    if source is None:
        return DEFAULT_DATASET
    if isinstance(source, str):
        return source
    if isinstance(source, dict):
        if "name" in source:
            return str(source["name"])
        if "bucket" in source:
            return f"storage:{source['bucket']}/{source.get('path')}"
        if set(source) <= _SPLIT_KEYS:
            return DEFAULT_DATASET
        return "inline"
    return type(source).__name__


def load_arrays(source: Any, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Return features and raw labels of `source`.

    `source` is a built-in name, `{"name": ...}`, inline `{"X": [[...]], "y":
    [...]}` (or `data`/`labels`), or `{"bucket": ..., "path": ...}` naming a
    CSV (label in the last column, or `label_column`) or NPZ (arrays `X` and
    `y`) object in storage.

    Raises:
        DatasetError: the source is unknown, missing or malformed.
    """
    if source is None:
        source = DEFAULT_DATASET
    if isinstance(source, dict) and set(source) <= _SPLIT_KEYS:
        source = source.get("name", DEFAULT_DATASET)
    if isinstance(source, dict) and "name" in source:
        raise DatasetError(
            f"dataset names a bundled set and has the keys {sorted(source)}; "
            f"give only {', '.join(sorted(_SPLIT_KEYS))}"
        )
    if isinstance(source, str):
        if source not in BUILTIN_DATASETS:
            raise DatasetError(
                f"unknown data set {source!r}; use one of "
                f'{", ".join(BUILTIN_DATASETS)}, inline {{"X": ..., "y": ...}}, '
                'or {"bucket": ..., "path": ...} for a CSV or NPZ object in storage'
            )
        x, y = _builtin(source)
        return x.copy(), y.copy()
    if not isinstance(source, dict):
        raise DatasetError(
            f"dataset {source!r} is neither a data set name nor an object; pass "
            '"digits" or {"X": [[...]], "y": [...]}'
        )
    if "bucket" in source:
        _reject_unknown_keys(source, _STORED_KEYS, "an object in storage")
        return _load_stored(source, settings)
    _reject_unknown_keys(source, _INLINE_KEYS, "an inline data set")
    x_key = "X" if "X" in source else "data"
    y_key = "y" if "y" in source else "labels"
    features = source.get(x_key)
    labels = source.get(y_key)
    if features is None or labels is None:
        raise DatasetError(
            f"inline dataset has keys {sorted(source)}; it needs features under "
            '"X" (or "data") and labels under "y" (or "labels")'
        )
    found = find_invalid_feature(features)
    if found is not None:
        index, value, problem = found
        position = "".join(f"[{i}]" for i in index)
        shown = format_shown_value(value)
        raise DatasetError(f"{x_key}{position} = {shown} is invalid: {problem}")
    x = _to_features(features)
    if x.ndim == 2 and x.shape[1] == 0:
        raise DatasetError(
            f"{x_key} has 0 features per sample ({x_key}[0] = []); give every "
            "sample at least one feature value"
        )
    return x, _inline_labels(labels, y_key)


def find_invalid_feature(
    values: Any,
) -> tuple[tuple[int, ...], Any, str] | None:
    """Find the first feature value of one sample or a list of samples that
    a model cannot take.

    Null, booleans, strings and objects are not numbers, and a number beyond
    the float32 range would become infinite. Lists nested deeper than a list
    of samples are left to the shape checks. Returns the entry's indices, its
    value and what is wrong with it, or None when every entry is valid.
    """
    if not isinstance(values, list | tuple):
        return None
    for i, item in enumerate(values):
        if isinstance(item, list | tuple):
            for j, value in enumerate(item):
                if isinstance(value, list | tuple):
                    continue
                problem = _feature_problem(value)
                if problem is not None:
                    return (i, j), value, problem
            continue
        problem = _feature_problem(item)
        if problem is not None:
            return (i,), item, problem
    return None


def _feature_problem(value: Any) -> str | None:
    if value is None:
        return "Input should be a number, not null"
    if isinstance(value, bool | np.bool_):
        return "Input should be a number, not a boolean; send 1 or 0"
    if isinstance(value, str):
        return 'Input should be a number, not a string; send 1.5, not "1.5"'
    if not isinstance(value, numbers.Real):
        return "Input should be a number"
    # An integer of any size compares with the limit exactly, where float()
    # of a huge one would overflow.
    if isinstance(value, numbers.Integral):
        magnitude: float | int = abs(int(value))
    else:
        magnitude = abs(float(value))
        if not np.isfinite(magnitude):
            return "Input should be a finite number: JSON has no NaN or Infinity"
    if magnitude > FLOAT32_MAX:
        return (
            "Input should be within ±3.4e38, the float32 range that models compute in"
        )
    return None


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, float) and value.is_integer()


def _inline_labels(values: Any, key: str) -> np.ndarray:
    """Return inline labels as an integer or a string array.

    Every label must be an integer (1.0 counts as 1, as in JSON Schema) or
    every label a string, so the array never contains Python objects, which
    NPZ stores only by pickling.

    Raises:
        DatasetError: naming the first label that breaks the rule.
    """
    if not isinstance(values, list | tuple):
        # A scalar or an object fails the shape check in `prepare`.
        return np.asarray(values)
    rule = "labels must be all integers or all strings (class names), one per sample"
    first_kind: str | None = None
    converted: list[int | str] = []
    for index, value in enumerate(values):
        if isinstance(value, str):
            kind = "a string"
            converted.append(value)
        elif _is_integer(value):
            kind = "an integer"
            converted.append(int(value))
        else:
            raise DatasetError(
                f"{key}[{index}] = {value!r} is neither an integer nor a string; {rule}"
            )
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise DatasetError(
                f"{key}[{index}] = {value!r} is {kind} but {key}[0] = {values[0]!r} "
                f"is {first_kind}; {rule}"
            )
    if first_kind == "a string":
        return np.asarray(converted, dtype=str)
    try:
        return np.asarray(converted, dtype=np.int64)
    except OverflowError:
        raise DatasetError(
            f"labels of {key} include integers beyond the 64-bit range; number "
            "the classes 0, 1, 2, ... or name them with strings"
        ) from None


def _to_features(values: Any) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        # Without numpy's message, which quotes the value: a stored object's
        # cells are not shown to the caller.
        raise DatasetError(
            "features are not a rectangular array of numbers; give one list of "
            "numbers per sample, all of the same length"
        ) from None
    return x


def _reject_unknown_keys(
    source: dict[str, Any], allowed: frozenset[str], kind: str
) -> None:
    """Raise for a key that `kind` does not read, since a misspelt option
    such as `label_col` would otherwise train on a default silently."""
    unknown = sorted(str(key) for key in source if key not in allowed)
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DatasetError(
        f"dataset has the unknown key {key!r}; {hint}{kind} takes only the keys "
        f"{', '.join(sorted(allowed))}"
    )


def _load_stored(
    source: dict[str, Any], settings: Settings
) -> tuple[np.ndarray, np.ndarray]:
    bucket, path = str(source["bucket"]), str(source.get("path", ""))
    try:
        blob = storage_for(settings).get(bucket, path)
    except StorageError as error:
        raise DatasetError(
            f"dataset object {bucket}/{path} cannot be read: {error}; upload it "
            "with storage_upload first"
        ) from None
    if path.endswith(".npz"):
        return _load_npz(blob, f"{bucket}/{path}")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"CSV object {bucket}/{path} cannot be read: it is not UTF-8 text "
            f"({error}); store comma-separated UTF-8 text, or an NPZ object "
            "named .npz"
        ) from None
    return _parse_csv(text, f"{bucket}/{path}", source.get("label_column", -1))


def _parse_csv(
    text: str, name: str, label_column: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Split CSV text into features and labels.

    A first row whose feature columns are not all numbers is a header.
    `label_column` is a column index (negative counts from the end) or a
    header name.

    Raises:
        DatasetError: ragged rows, a single column, or an invalid
            `label_column`.
    """
    reader = csv.reader(io.StringIO(text))
    numbered = [(reader.line_num, row) for row in reader if row]
    if not numbered:
        raise DatasetError(f"CSV object {name} is empty")
    first_line, first = numbered[0]
    columns = len(first)
    for line, row in numbered:
        if len(row) != columns:
            raise DatasetError(
                f"CSV object {name} has {len(row)} columns on line {line} but "
                f"{columns} on line {first_line}; give every row the same columns"
            )
    if columns < 2:
        raise DatasetError(
            f"CSV object {name} has 1 column, so each row is a label without "
            "features; separate the values with commas, as in 5.1,3.5,0"
        )
    rows = [row for _, row in numbered]
    if isinstance(label_column, str):
        # A label column given by name makes the first row the header.
        header = rows.pop(0)
        if label_column not in header:
            raise DatasetError(
                f"label_column {label_column!r} is not a name in the first row of "
                f"{name}; give a header name or a column index from {-columns} to "
                f"{columns - 1}"
            )
        index = header.index(label_column)
    else:
        index = _column_index(label_column, columns, name)
        if not all(_is_number(v) for i, v in enumerate(rows[0]) if i != index):
            rows.pop(0)
    if not rows:
        raise DatasetError(f"CSV object {name} has a header row but no data rows")
    labels = [row[index].strip() for row in rows]
    features = [[value for i, value in enumerate(row) if i != index] for row in rows]
    data_lines = [line for line, _ in numbered][len(numbered) - len(rows) :]
    for line, row in zip(data_lines, rows, strict=True):
        for column, value in enumerate(row):
            if column != index and not _is_number(value):
                # The position only: the cell may contain anything stored.
                raise DatasetError(
                    f"CSV object {name} has a feature that is not a number on "
                    f"line {line}, column {column + 1}; give numbers in every "
                    "column but the label column"
                )
    return _to_features(features), _csv_labels(labels)


def _csv_labels(labels: list[str]) -> np.ndarray:
    """Return CSV labels as whole numbers when every one is a whole number,
    as inline labels are, so that `1` and `1.0` are one class. Other labels
    stay text."""
    # Exact: a float would merge whole numbers above 2**53.
    if all(_WHOLE_NUMBER.fullmatch(label) for label in labels):
        return np.asarray([int(label.split(".")[0]) for label in labels])
    return np.asarray(labels)


# A whole number as a CSV cell may write it: digits, then `.` and zeros.
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+(\.0*)?")


def _column_index(value: Any, columns: int, name: str) -> int:
    """Return the 0-based index of the column that `label_column` names.

    Raises:
        DatasetError: `value` is not an integer (booleans are not) or is
            outside the columns.
    """
    fix = (
        f"give a column index from 0 to {columns - 1} (or {-columns} to -1 from "
        "the end) or a header name"
    )
    if isinstance(value, bool):
        raise DatasetError(
            f"label_column {format_shown_value(value)} is invalid: a boolean is "
            f"not a column index; {fix}"
        )
    if not _is_integer(value):
        raise DatasetError(
            f"label_column {value!r} is invalid: it is neither an integer column "
            f"index nor a header name; {fix}"
        )
    index = int(value)
    if not -columns <= index < columns:
        raise DatasetError(
            f"label_column {value!r} is invalid: {name} has {columns} columns; {fix}"
        )
    return index % columns


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_npz(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    def unreadable(problem: str) -> DatasetError:
        return DatasetError(
            f"NPZ object {name} cannot be read: {problem}; store it with "
            "numpy.savez(file, X=features, y=labels), with numeric features and "
            "integer or string labels"
        )

    # numpy.load reads anything that is neither ZIP nor .npy as a pickle,
    # which it rejects with a message about allow_pickle.
    if blob.startswith(_NPY_MAGIC):
        raise unreadable("it is a single .npy array, not an NPZ archive")
    if not blob.startswith(_ZIP_MAGIC):
        raise unreadable("it is not an NPZ (ZIP) archive")
    try:
        # allow_pickle stays False: a pickle runs code of the uploader's choice.
        loaded = np.load(io.BytesIO(blob))
    except _NPZ_READ_ERRORS as error:
        raise unreadable(f"the archive is damaged or truncated ({error})") from None
    if not isinstance(loaded, NpzFile):
        raise unreadable("it is not an NPZ (ZIP) archive")
    with loaded as archive:
        keys = set(archive.files)
        x_key = "X" if "X" in keys else "data"
        y_key = "y" if "y" in keys else "labels"
        if x_key not in keys or y_key not in keys:
            raise DatasetError(
                f"NPZ object {name} has arrays {sorted(keys)}; it needs "
                "X and y (or data and labels)"
            )
        arrays = []
        for key in (x_key, y_key):
            try:
                arrays.append(archive[key])
            except _NPZ_READ_ERRORS as error:
                if _holds_objects(archive, key):
                    raise unreadable(
                        f"array {key} contains Python objects (dtype object), which "
                        "NPZ stores only as a pickle, and pickles are not loaded"
                    ) from None
                raise unreadable(f"array {key} is damaged ({error})") from None
    return _to_features(arrays[0]), np.asarray(arrays[1])


def _holds_objects(archive: NpzFile, key: str) -> bool:
    """Return whether an NPZ member's header declares an object dtype."""
    if archive.zip is None:
        return False
    try:
        with archive.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(member)
            else:
                header = np.lib.format.read_array_header_2_0(member)
    except _NPZ_READ_ERRORS:
        return False
    return bool(header[2].hasobject)


def prepare(
    source: Any, settings: Settings, *, seed: int = 0, test_fraction: float = 0.2
) -> Dataset:
    """Load, check, split (a seeded permutation) and standardize a data set.
    A built-in set given as `{"name": ..., "seed": ..., "test_fraction": ...}`
    takes its split's seed and test fraction from there.

    Raises:
        DatasetError: shapes or labels do not fit a classifier; the message
            names the value.
    """
    if isinstance(source, dict) and set(source) <= _SPLIT_KEYS:
        seed, test_fraction = _split_options(source, seed, test_fraction)
    x, labels = load_arrays(source, settings)
    if x.ndim != 2:
        raise DatasetError(
            f"features have shape {x.shape}; they must be 2-D (samples, features)"
        )
    if x.shape[1] == 0:
        raise DatasetError(
            f"features have shape {x.shape}, so the samples have no features; "
            "give every sample at least one feature value"
        )
    if labels.ndim != 1:
        raise DatasetError(f"labels have shape {labels.shape}; they must be 1-D")
    if len(x) != len(labels):
        raise DatasetError(
            f"X has {len(x)} samples but y has {len(labels)} labels; give one "
            "label per sample"
        )
    if len(x) < 4:
        raise DatasetError(f"the data set has {len(x)} samples; at least 4 are needed")
    if not np.isfinite(x).all():
        raise DatasetError("features contain NaN or infinite values; remove them")
    if labels.dtype.kind not in "iub":
        labels = labels.astype(str)
    names, y = np.unique(labels, return_inverse=True)
    if len(names) < 2:
        # A stored object's label is a cell, which is not shown to the caller.
        shown = "" if is_stored(source) else f" {names[0].item()!r}"
        raise DatasetError(
            f"labels have a single class{shown}; a classifier needs at least 2"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    test_count = max(1, round(len(x) * test_fraction))
    test, train = order[:test_count], order[test_count:]
    # In float64: features up to float32's limit (3.4e38) overflow a float32
    # sum or square, which made the standardized column NaN or all zeros.
    # Their mean and standard deviation fit float32 again.
    wide = x.astype(np.float64)
    mean = wide[train].mean(axis=0)
    std = wide[train].std(axis=0)
    std[std < 1e-6] = 1.0
    scaled = (wide - mean) / std
    too_far = np.argwhere(np.abs(scaled) > np.finfo(np.float32).max)
    if too_far.size:
        sample, feature = (int(i) for i in too_far[0])
        raise DatasetError(
            f"X[{sample}][{feature}] = {float(x[sample, feature]):g} lies "
            f"{abs(scaled[sample, feature]):.3g} standard deviations from its "
            "feature's mean on the training split, too far for a model to take; "
            "remove that sample or rescale the feature"
        )
    standardized = scaled.astype(np.float32)
    return Dataset(
        name=describe_source(source),
        x_train=standardized[train],
        y_train=y[train].astype(np.int32),
        x_test=standardized[test],
        y_test=y[test].astype(np.int32),
        classes=len(names),
        label_names=[str(name) for name in names],
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
    )


def _split_options(
    source: dict[str, Any], seed: int, test_fraction: float
) -> tuple[int, float]:
    """Return the split's seed and test fraction that a named data set gives.

    Raises:
        DatasetError: a value that is not a whole number of 0 or more (seed)
            or a number in (0, 0.9] (test_fraction).
    """
    given_seed = source.get("seed", seed)
    if (
        isinstance(given_seed, bool)
        or not isinstance(given_seed, int)
        or given_seed < 0
    ):
        raise DatasetError(
            f"dataset.seed {given_seed!r} is invalid; give a whole number of 0 or more"
        )
    fraction = source.get("test_fraction", test_fraction)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 < fraction <= 0.9
    ):
        raise DatasetError(
            f"dataset.test_fraction {fraction!r} is invalid; give a number above 0 "
            "and at most 0.9"
        )
    return given_seed, float(fraction)


def save_dataset(dataset: Dataset) -> bytes:
    """Serialize a prepared split as NPZ, for nodes that read it from storage."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        x_train=dataset.x_train,
        y_train=dataset.y_train,
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        label_names=np.asarray(dataset.label_names),
        mean=dataset.mean,
        std=dataset.std,
    )
    return buffer.getvalue()


def load_dataset(blob: bytes, name: str) -> Dataset:
    with np.load(io.BytesIO(blob)) as archive:
        labels = [str(v) for v in archive["label_names"]]
        return Dataset(
            name=name,
            x_train=archive["x_train"],
            y_train=archive["y_train"],
            x_test=archive["x_test"],
            y_test=archive["y_test"],
            classes=len(labels),
            label_names=labels,
            mean=archive["mean"],
            std=archive["std"],
        )
