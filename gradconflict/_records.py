"""What a command or a training run used, in the words and keys every record shares (``gram_config.json``, a
run's ``config.json`` ``used`` entry, ...): the schedule in words and the dataset read. The command-line side
(printing, writing) is ``gradconflict.cli._records``."""

from __future__ import annotations

from typing import Any

__all__ = ["schedule_words", "describe_schedule", "dataset_record"]


def schedule_words(name: str, T: int) -> str:
    """A schedule named ``name`` with ``T`` timesteps, in words: "linear (T = 1000)", or "from diffusers scheduler
    DDPMScheduler (T = 1000)" for one read from a diffusers scheduler."""
    name = str(name)
    if name.endswith("Scheduler") or name.split("+")[0].endswith("Scheduler"):
        return f"from diffusers scheduler {name} (T = {int(T)})"
    return f"{name} (T = {int(T)})"


def describe_schedule(schedule: Any) -> str:
    """The schedule a command used, in words: "linear (T = 1000)", "from diffusers scheduler DDPMScheduler
    (T = 1000)", or "custom (T = ...)" for one given as numbers."""
    return schedule_words(getattr(schedule, "name", "custom"), schedule.T)


def dataset_record(data: Any, path: Any) -> dict[str, Any]:
    """What was read from ``path``: ``name``, ``path``, ``N`` images and the ``shape`` of one image."""
    return {"name": data.name, "path": str(path), "N": int(data.images.shape[0]),
            "shape": [int(d) for d in data.images.shape[1:]]}
