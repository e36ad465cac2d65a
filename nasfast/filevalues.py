"""Values read from files (results JSON, caches, DeepSpeed configs, manifests): checked like config values.

A config value is type- and range-checked when it is loaded (``nasfast.config``); a value nasfast
reads back from a file gets the same checks here, so a hand-edited or damaged file fails with one
``UserError`` line naming the file and the field (``ds.json: zero_optimization.stage must be an
integer 0-3, got "two"``) instead of a ValueError deep inside, or a silent ``n/a``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NoReturn, Optional

from nasfast.errors import UserError

AUTO = "auto"


def shown(value: Any) -> str:
    """A value as the file spells it (JSON), cut to one short line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(where: str | Path, field: str, wants: str, value: Any) -> NoReturn:
    raise UserError(f"{where}: {field} must be {wants}, got {shown(value)}")


def is_number(value: Any) -> bool:
    """A JSON number (int or float, NaN and inf included), not a boolean (``True`` is an int in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(lo: Optional[float], hi: Optional[float]) -> str:
    if lo is not None and hi is not None:
        return f" {lo:g}-{hi:g}" if isinstance(lo, int) and isinstance(hi, int) else f" in [{lo:g}, {hi:g}]"
    if lo is not None:
        return f" >= {lo:g}"
    return f" <= {hi:g}" if hi is not None else ""


def _or_auto(wants: str, auto: bool) -> str:
    return f'{wants} or "auto"' if auto else wants


def integer(where: str | Path, field: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None,
            auto: bool = False, integral_float: bool = False) -> Any:
    """``value`` is an int in [lo, hi] (or "auto" where allowed); ``integral_float`` also takes 5e8."""
    if auto and value == AUTO:
        return value
    ok = is_number(value) and (isinstance(value, int) or (integral_float and math.isfinite(value) and float(value).is_integer()))
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(where, field, _or_auto(f"an integer{_bounds(lo, hi)}", auto), value)
    return value


def number(where: str | Path, field: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
           auto: bool = False) -> Any:
    """``value`` is a finite number in [lo, hi] (or "auto" where allowed)."""
    if auto and value == AUTO:
        return value
    if not is_number(value) or not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(where, field, _or_auto(f"a finite number{_bounds(lo, hi)}", auto), value)
    return value


def boolean(where: str | Path, field: str, value: Any, auto: bool = False) -> Any:
    """``value`` is true or false (JSON), not 1, "yes" or "true"."""
    if auto and value == AUTO:
        return value
    if not isinstance(value, bool):
        fail(where, field, _or_auto("true or false", auto), value)
    return value


def string(where: str | Path, field: str, value: Any) -> str:
    if not isinstance(value, str):
        fail(where, field, "a string", value)
    return value


def mapping(where: str | Path, field: str, value: Any) -> dict:
    if not isinstance(value, dict):
        fail(where, field, "an object", value)
    return value


def load_json(path: str | Path, what: str) -> Any:
    """The parsed JSON of ``path``; one UserError line (naming ``what``) if it is missing, not UTF-8 or not JSON."""
    from nasfast.files import read_text

    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def load_cache_entry(path: str | Path) -> dict:
    """One cache entry (a JSON object nasfast wrote); damaged or hand-edited, it is refused with the cure."""
    path = Path(path)
    try:
        record = load_json(path, "cache entry")
        return mapping(path, "the entry", record)
    except UserError as exc:
        raise UserError(f"{exc}; remove it (it is recomputed) or use another --out") from None


def scores(path: str | Path, record: dict, keys: tuple[str, ...], prefix: str = "") -> None:
    """Each of ``keys`` is a number (NaN included: a diverged or unscorable child is recorded as such)."""
    for key in keys:
        if key not in record or not is_number(record[key]):
            fail(path, f"{prefix}{key}", "a number", record.get(key))
