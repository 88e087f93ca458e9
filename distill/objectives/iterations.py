"""GRPO's ``num_iterations``: the rollouts of an optimizer-step window, kept for its later iterations.

The data module repeats each window's prompt batches (``PromptDataModule(num_iterations=...)``) and
says where each batch stands (``window``, ``iteration``, ``iterations``). The first iteration samples
the rollout; its training forward gives the log-probs of the policy that sampled it (``old_logps``);
the later iterations train again on the kept rows, against those log-probs. A new window makes the
kept rollouts of an earlier one (cut short by ``limit_train_batches`` or the end of the fit) stale:
they are dropped. The kept rollouts are part of the fit's checkpoint, so a fit resumed between two
iterations of a window trains the iterations left on the rollout it was sampled with.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

Key = tuple[str, ...]  # the prompt SHAs of a batch


class KeptRollouts:
    def __init__(self) -> None:
        self.window: int | None = None
        self.rows: dict[Key, dict[str, Any]] = {}

    def take(self, key: Key, window: int, iteration: int, iterations: int) -> dict[str, Any] | None:
        """The rows kept for ``key``'s later iterations, or None (the first iteration: sample it); the
        last iteration takes them out. A batch of another window ends the kept window's."""
        if window != self.window:
            self.window, self.rows = window, {}
        rows = self.rows.get(key) if iteration else None
        if rows is not None and iteration == iterations - 1:
            del self.rows[key]
        return rows

    def keep(self, key: Key, rows: dict[str, Any]) -> None:
        """Keep a rollout's rows (tensors; ints) for the window's later iterations."""
        self.rows[key] = rows

    def add_old_logps(self, key: Key, logps: Tensor) -> None:
        """The first iteration's log-probs of a kept rollout: the policy that sampled it."""
        rows = self.rows.get(key)
        if rows is not None and "old_logps" not in rows:
            rows["old_logps"] = logps.detach()

    def state(self) -> dict[str, Any] | None:
        """The kept rows on the CPU (a checkpoint is gathered from every rank), or None when none are."""
        if not self.rows:
            return None
        return {"window": self.window, "rows": {key: on_cpu(rows) for key, rows in self.rows.items()}}

    def load(self, state: dict[str, Any] | None) -> None:
        self.window, self.rows = (None, {}) if state is None else (state["window"], dict(state["rows"]))


def on_cpu(rows: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in rows.items()}
