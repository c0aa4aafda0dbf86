"""Keras-style progress: ``Epoch 1/10`` then ``469/469 ━━━━ 3s 6ms/step - accuracy: 0.9812 - loss: 0.0587``."""

from __future__ import annotations

import time


def epochs_text(epochs: int) -> str:
    """'1 epoch', '15 epochs': for the lines that report a run."""
    return f"{epochs} epoch" + ("s" if epochs != 1 else "")


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 3600 else f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"


def _per_step_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms/step" if seconds < 1 else f"{seconds:.1f}s/step"


def _metrics_text(metrics: dict) -> str:
    # Keras lists metrics by name: accuracy, loss, val_accuracy, val_loss
    shown = sorted(k for k in metrics if k not in ("epoch", "seconds"))
    return "".join(f" - {k}: {metrics[k]:.4f}" for k in shown)


class ProgressBar:
    """What ``fit`` prints with ``verbose=1``: a live bar within each epoch on a terminal, a line per epoch always.

    The live line puts the step count, ETA and time per step first and shrinks the bar to fit the terminal,
    so a narrow window cuts metrics, never the count or the time left. Nothing is shown before the first step.
    """

    BAR_WIDTH = 20

    def __init__(self, epochs: int, steps: int, verbose: int = 1):
        self.epochs, self.steps, self.verbose = epochs, steps, verbose
        self.console = None
        self.live = None
        self.every = max(1, steps // 100)
        self.epoch_start = 0.0
        if verbose >= 1:
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def live_updates(self) -> bool:
        """Whether per-step updates are shown (only on a terminal): ``fit`` skips the host sync otherwise."""
        return self.console is not None and self.console.is_terminal

    def begin_epoch(self, epoch: int) -> None:
        if self.console is None:
            return
        self.console.print(f"Epoch {epoch}/{self.epochs}")
        self.epoch_start = time.perf_counter()
        if self.live_updates:
            from rich.live import Live

            self.live = Live(console=self.console, transient=True, auto_refresh=False)
            self.live.start()

    def wants_step(self, step: int) -> bool:
        return self.live is not None and (step % self.every == 0 or step == self.steps)

    def step(self, step: int, metrics: dict) -> None:
        """Show step ``step`` of the epoch with the running metrics."""
        if self.live is None:
            return
        from rich.text import Text

        elapsed = time.perf_counter() - self.epoch_start
        per_step = elapsed / step
        head = f"{step}/{self.steps} "
        tail = f" ETA {_seconds_text(per_step * (self.steps - step))} {_per_step_text(per_step)}"
        room = self.console.width - len(head) - len(tail) - 1
        self.live.update(Text(head + self._bar(step, min(self.BAR_WIDTH, max(5, room))) + tail
                              + _metrics_text(metrics), no_wrap=True, overflow="ellipsis"), refresh=True)

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        """The epoch's lasting line; ``fit`` calls it only once the epoch is done (and checkpointed)."""
        self._stop_live()
        if self.console is None:
            return
        seconds = metrics.get("seconds", time.perf_counter() - self.epoch_start)
        self.console.print(f"{self.steps}/{self.steps} {self._bar(self.steps, self.BAR_WIDTH)} "
                           f"{_seconds_text(seconds)} {_per_step_text(seconds / max(self.steps, 1))}"
                           + _metrics_text(metrics))

    def close(self) -> None:
        self._stop_live()

    def _bar(self, step: int, width: int) -> str:
        done = round(width * step / max(self.steps, 1))
        return "━" * done + " " * (width - done) if done < width else "━" * width

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
