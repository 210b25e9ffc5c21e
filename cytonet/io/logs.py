"""Logging a person can follow: timestamped lines on stderr, and progress bars only on a terminal.

``setup_logging`` is called once by the ``cytonet`` command (``cytonet -v ...`` / ``cytonet -q ...``); stage modules
only ask ``logging.getLogger(__name__)`` for their logger. A line looks like::

    2026-12-01 18:03:12 INFO cytonet.learn.pretrain: step 100/1500 loss 4.1532 ...

``progress`` wraps an iterable in a tqdm bar when stderr is a terminal and returns it unchanged otherwise, so log
files written by Snakemake or Slurm never fill with carriage-return updates. No torch here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_HANDLER_MARK = "_cytonet_handler"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is at each write (pytest's capture swaps it)."""

    @property
    def stream(self) -> Any:  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def level_for(verbosity: int) -> int:
    """Level of the ``cytonet`` loggers: 0 INFO, > 0 DEBUG, -1 WARNING, < -1 ERROR."""
    if verbosity > 0:
        return logging.DEBUG
    if verbosity == 0:
        return logging.INFO
    return logging.WARNING if verbosity == -1 else logging.ERROR


def setup_logging(verbosity: int = 0) -> None:
    """Send log records to stderr with timestamps; idempotent (a second call only changes the level).

    ``verbosity`` is ``-v`` count minus ``-q`` count. It sets the level of the ``cytonet`` loggers; other libraries
    stay at WARNING unless ``verbosity >= 2`` (``-vv``), which shows their debug output too.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, _HANDLER_MARK, False)), None)
    if handler is None:
        handler = _StderrHandler()
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.setLevel(logging.NOTSET)
    level = level_for(verbosity)
    root.setLevel(logging.DEBUG if verbosity >= 2 else max(level, logging.WARNING))
    logging.getLogger("cytonet").setLevel(level)


class _NoBar:
    """Stands in for a tqdm bar that is not shown (``progress(None, ...)`` off a terminal)."""

    def update(self, n: float = 1) -> None:  # noqa: D102
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def show_progress(enabled: bool = True) -> bool:
    """Whether a progress bar would be drawn: enabled and stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(enabled and isatty is not None and isatty())


def progress(iterable: Iterable | None, *, desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` on a terminal; otherwise ``iterable`` itself (nothing drawn).

    With ``iterable=None`` it returns a manual bar (``update``, ``set_postfix``, ``close``): a tqdm bar on a
    terminal, else an object whose methods do nothing. Extra keywords go to tqdm (``mininterval``, ``initial``).
    """
    if not show_progress(enabled):
        return _NoBar() if iterable is None else iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, **tqdm_kwargs)


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour), for elapsed times and ETAs in log lines."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN or infinite
        return "?"
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
