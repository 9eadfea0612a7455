"""One place that decides how progress bars look and when they are shown."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """Wrap a long loop in a progress bar on stderr.

    Bars are hidden when stderr is not a terminal (CI logs) unless SLIMLM_PROGRESS=1, and always
    hidden with SLIMLM_PROGRESS=0.
    """
    return iter(progress_bar(items, desc, total, enabled))


def progress_bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool | None = None) -> tqdm:
    """`progress`, returning the bar itself (iterate it; `set_postfix` shows a running value such as a loss)."""
    if enabled is None:
        flag = os.environ.get("SLIMLM_PROGRESS")
        enabled = sys.stderr.isatty() if flag is None else flag == "1"
    return tqdm(items, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True)
