"""Raw labels -> ``(targets, classes)`` for single-label classification.

Every source that reads labels it did not number itself (Hugging Face columns, manifests,
foreign data sets, lists of pairs) goes through :func:`encode_labels` (text cells through
:func:`encode_text_labels`, which keeps them as written), so multi-label and regression
data are refused in one place, with the column named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import numpy as np

from inca.errors import DataError

SUPPORTED = ("inca supports single-label classification only: one class per sample, given "
             "as a class name, an integer class index or a Hugging Face ClassLabel")


def refuse(source: str, column: str, what: str) -> DataError:
    """The error for labels inca cannot learn: multi-label, regression, structured."""
    return DataError(f"{source}: label column {column!r} holds {what}; {SUPPORTED}. Choose "
                     "another column with --label-column (label_column=), or reduce the labels "
                     "to one class per sample")


def _scalar(v: Any, i: int, source: str, column: str) -> Any:
    """One label as ``int``, ``str`` or ``float`` (checked later), or an error."""
    if hasattr(v, "ndim") and hasattr(v, "tolist"):  # numpy / torch values
        if v.ndim != 0:
            raise refuse(source, column, f"several values per sample (an array of shape "
                                         f"{tuple(v.shape)} at sample {i}): multi-label data")
        v = v.tolist()
    if isinstance(v, list | tuple | set | frozenset):
        raise refuse(source, column, f"several labels per sample ({v!r} at sample {i}): "
                                     "multi-label data")
    if isinstance(v, dict):
        raise refuse(source, column, f"structured values ({v!r} at sample {i})")
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        raise DataError(f"{source}: sample {i} has no label in column {column!r}; remove "
                        "unlabelled samples")
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | str | float):
        return v
    raise refuse(source, column, f"values of type {type(v).__name__} ({v!r} at sample {i})")


def encode_labels(values: Iterable[Any], *, source: str, column: str,
                  classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer targets and class names for raw labels.

    Integers index ``classes`` when given; otherwise the class names are the sorted
    distinct labels (integers sorted as numbers and named by their digits). Text labels
    are class names. Whole floats (``3.0``) count as integers.

    Args:
        values: one label per sample.
        source: how messages name the data.
        column: how messages name the labels.
        classes: known class names (a ClassLabel's, a data set's ``classes``).

    Raises:
        DataError: multi-label or regression-looking labels, a missing label, a label
            that ``classes`` does not name.
    """
    raw = [_scalar(v, i, source, column) for i, v in enumerate(values)]
    for i, v in enumerate(raw):
        if isinstance(v, float):
            if not math.isfinite(v) or not v.is_integer():
                raise refuse(source, column, f"fractional numbers ({v!r} at sample {i}), which "
                                             "look like regression targets")
            raw[i] = int(v)
    if not raw:
        return np.zeros(0, dtype=np.int64), list(classes or [])
    if all(isinstance(v, int) for v in raw):
        ints = np.asarray(raw, dtype=np.int64)
        if classes is not None:
            return ints, [str(c) for c in classes]
        neg = np.nonzero(ints < 0)[0]
        if neg.size:
            raise _negative(source, column, int(neg[0]), int(ints[neg[0]]))
        distinct = np.unique(ints)
        return np.searchsorted(distinct, ints).astype(np.int64), [str(v) for v in distinct]
    names = [str(v) for v in raw]
    if classes is None:
        known = sorted(set(names))
    else:
        known = [str(c) for c in classes]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise DataError(f"{source}: labels {unknown[:10]} in column {column!r} are not "
                            f"among the classes {known[:20]}")
    index = {c: k for k, c in enumerate(known)}
    return np.asarray([index[n] for n in names], dtype=np.int64), known


def _negative(source: str, column: str, i: int, label: Any) -> DataError:
    return DataError(f"{source}: sample {i} has label {label}, outside the classes (column "
                     f"{column!r}); a negative label marks an unlabelled sample: remove those "
                     "samples")


_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)")


def encode_text_labels(values: Sequence[Any], *, source: str, column: str,
                       classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """:func:`encode_labels` for labels read as text (CSV cells): each label is the class
    name exactly as written, so ``01``, ``1`` and ``007`` are three classes, and ``nan``
    and ``inf`` are names, not numbers.

    The class order: when every label is a plain integer (``-?[0-9]+``) and no number is
    spelt two ways (``01`` and ``1``), by value (``2``, ``9``, ``10``); otherwise as text.
    Refused as in :func:`encode_labels`: negative integers (unlabelled samples) and
    decimals with a fractional part when every label is a decimal (regression targets).
    With ``classes``, integers that name no class index them.
    """
    names = [str(_scalar(v, i, source, column)) for i, v in enumerate(values)]
    distinct = set(names)
    if not names:
        return np.zeros(0, dtype=np.int64), list(classes or [])
    integers = all(_INTEGER.fullmatch(n) for n in distinct)
    if classes is not None:
        if integers and not distinct <= {str(c) for c in classes}:
            names = [int(Decimal(n)) for n in names]  # type: ignore[misc]
        return encode_labels(names, source=source, column=column, classes=classes)
    known = sorted(distinct)
    if integers:
        value = {n: Decimal(n) for n in distinct}
        neg = next((i for i, n in enumerate(names) if value[n] < 0), None)
        if neg is not None:
            raise _negative(source, column, neg, names[neg])
        if len(set(value.values())) == len(distinct):
            known.sort(key=value.__getitem__)
    elif all(_DECIMAL.fullmatch(n) for n in distinct):
        frac = next((i for i, n in enumerate(names)
                     if Decimal(n) != Decimal(n).to_integral_value()), None)
        if frac is not None:
            raise refuse(source, column, f"fractional numbers ({names[frac]!r} at sample "
                                         f"{frac}), which look like regression targets")
    index = {c: k for k, c in enumerate(known)}
    return np.asarray([index[n] for n in names], dtype=np.int64), known


#: Longest class name, in characters (a folder name holds at most 255 bytes).
MAX_CLASS_NAME = 256
# Characters that change what a terminal shows: C0 and C1 controls (NUL, newline, tab,
# escape, DEL, NEL, ...), line and paragraph separators, bidirectional-text controls
# (U+202E turns "photo\u202egnp.exe" into "photoexe.png") and lone surrogates.
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069\ud800-\udfff]")
CLASS_NAME_RULE = (f"a class name is printed in predictions, reports and the CLI, so it "
                   f"must be 1 to {MAX_CLASS_NAME} characters with no control characters "
                   "(NUL, newline, tab, ...) and no bidirectional-text controls (U+202E, ...)")


def class_name_problem(name: Any) -> str | None:
    """What makes ``name`` unfit to be a class name (see :data:`CLASS_NAME_RULE`), as the
    end of a sentence about it (``"holds the control character U+000A"``); ``None`` when
    it is fit. Accented, non-Latin and emoji names are fine."""
    if not isinstance(name, str) or not name:
        return "is empty" if name == "" else f"is a {type(name).__name__}, not text"
    if len(name) > MAX_CLASS_NAME:
        return f"is {len(name):,} characters long, over {MAX_CLASS_NAME}"
    bad = _UNSHOWN.search(name)
    if bad is None:
        return None
    return f"holds the {_kind(bad.group())} U+{ord(bad.group()):04X} at position {bad.start()}"


def _kind(ch: str) -> str:
    if ch <= "\x9f":
        return "control character"
    if ch in "\u2028\u2029":
        return "line or paragraph separator"
    if ch >= "\ud800":
        return "lone surrogate"
    return "bidirectional-text control"


def shown_name(name: Any) -> str:
    """A class name for a message: its ``repr`` (controls escaped), cut short."""
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."
