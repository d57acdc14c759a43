"""Progress bars for long evaluation loops (FID samples and reference statistics, bits/dim, NFE
sweeps, reflow pairs), drawn with rich like Lightning's ``RichProgressBar``.

A bar is transient (it disappears when its loop ends) and is shown only where it can render:
on global rank zero and on an interactive console (a terminal or Jupyter), so logs, pipes and
pytest get nothing. Inside a running Lightning ``RichProgressBar`` it nests below the training
bar (rich >= 14.1 stacks Live displays); a rich that cannot nest gets no bar rather than a
``LiveError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TypeVar

import rich
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

__all__ = ["track", "num_examples"]

T = TypeVar("T")


class _RateColumn(ProgressColumn):
    """Work per second in the task's ``unit``, e.g. ``1,212 img/s`` or ``0.25 setting/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        rate = f"{speed:,.0f}" if speed >= 100 else f"{speed:.3g}"
        return Text(f"{rate} {task.fields['unit']}/s", style="progress.data.speed")


def _can_show(console: Console) -> bool:
    """An interactive console, with no Live display active that this rich version cannot nest under."""
    interactive = (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter
    nests = hasattr(console, "_live_stack")  # rich >= 14.1; older versions raise LiveError on a second Live
    return interactive and (nests or getattr(console, "_live", None) is None)


def track(
    iterable: Iterable[T],
    description: str,
    total: float | None = None,
    *,
    advance: Callable[[T], float] | None = None,
    unit: str = "it",
    enabled: bool = True,
    console: Console | None = None,
) -> Iterator[T]:
    """Yield every item of ``iterable`` once while a bar shows ``description``, completed/total,
    the rate and the time left. Each item is counted after the loop body has processed it, and
    the display refreshes then, so items should be slow ones (batches).

    Args:
        iterable: the work items.
        description: the bar's label.
        total: the amount of work (default: ``len(iterable)`` if it has one, else unknown).
        advance: ``advance(item) -> amount`` of work in one item (default 1), e.g. images per batch.
        unit: what is counted, for the rate (``img`` -> ``img/s``).
        enabled: ``False`` shows nothing. Nothing is shown on non-zero global ranks and on
            non-interactive consoles either.
        console: the rich console (default: rich's global one, which Lightning's bar uses too).
    """
    console = console or rich.get_console()
    if not (enabled and rank_zero_only.rank == 0 and _can_show(console)):
        yield from iterable
        return
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               _RateColumn(), TimeRemainingColumn(elapsed_when_finished=True))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, unit=unit)
        for item in iterable:
            yield item
            # refresh=True: a bar nested under another Live is drawn only when refreshed.
            progress.update(task, advance=1 if advance is None else advance(item), refresh=True)


def num_examples(loader: Iterable) -> int | None:
    """The length of a DataLoader's dataset, the total of a bar that counts examples (``None``
    when it has none, e.g. for an iterable dataset)."""
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if isinstance(dataset, Sized) else None
