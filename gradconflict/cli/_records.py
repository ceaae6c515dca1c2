"""What a command used, said once and kept: the noise schedule, the prediction type, which weights (EMA or raw)
and the data, printed in one line on stderr and recorded in the command's config JSON under the keys
``gram_config.json`` has always used:

* ``schedule``: the schedule in words (``describe_schedule``: "linear (T = 1000)", "from diffusers scheduler
  DDPMScheduler (T = 1000)"), ``T``: its number of timesteps;
* ``prediction``: "eps", "x0" or "v" (a diffusers scheduler's ``v_prediction`` is "v");
* ``weights``: the weights loaded ("ema", "raw", "as saved": a file with one set of weights, "init": none
  loaded), ``weights_requested``: ``--weights`` as given (None: the default, EMA where the file holds it);
* ``data``: ``--data`` as given (None: the command reads no data), ``dataset``: what was read (``name``,
  ``path``, ``N`` images, ``shape`` of one image).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .._io import write_json
from .._records import dataset_record, describe_schedule, schedule_words

__all__ = ["describe_schedule", "schedule_words", "model_record", "config_record", "record_line", "report_record",
           "write_record"]


def model_record(loaded: Any, requested: Optional[str] = None, data: Any = None,
                 data_arg: Optional[str] = None) -> dict[str, Any]:
    """The record (module docstring) of ``loaded`` (a ``LoadedModel``: its ``schedule``, ``prediction`` and
    ``weights``), ``--weights`` as given (``requested``) and the dataset ``data`` read from ``--data data_arg``
    (both None for a command that reads no data)."""
    record: dict[str, Any] = {
        "schedule": describe_schedule(loaded.schedule), "T": int(loaded.schedule.T), "prediction": loaded.prediction,
        "weights": loaded.weights, "weights_requested": requested, "data": None if data_arg is None else str(data_arg),
        "dataset": None,
    }
    if data is not None:
        record["dataset"] = dataset_record(data, data_arg)
    return record


def config_record(schedule: str, T: int, prediction: str, weights: str, data: Optional[str]) -> dict[str, Any]:
    """The record (module docstring) of models a command trains itself (``compare``, ``reproduce``): from their
    config's schedule name, ``T``, prediction, the weights it evaluates, and ``data`` as configured."""
    return {"schedule": schedule_words(schedule, T), "T": int(T), "prediction": prediction, "weights": weights,
            "data": data, "dataset": None}


def record_line(command: str, record: dict[str, Any], weights: bool = False) -> str:
    """"gradconflict CMD: schedule S, P prediction; data NAME: N images of CxHxW" (the data part: what the record
    holds of it; "no data" for a command that reads none), and "; W weights" with ``weights`` (for a command
    that prints no ``report_weights`` line of its own)."""
    dataset = record.get("dataset")
    if dataset:
        data = f"data {dataset['name']}: {dataset['N']} images of {'x'.join(map(str, dataset['shape']))}"
    elif record.get("data") is not None:
        data = f"data {record['data']}"
    else:
        data = "no data"
    used = f"; {record['weights']} weights" if weights else ""
    return f"gradconflict {command}: schedule {record['schedule']}, {record['prediction']} prediction; {data}{used}"


def report_record(command: str, record: dict[str, Any], weights: bool = False) -> None:
    """Print ``record_line`` on stderr (stdout stays the command's results)."""
    print(record_line(command, record, weights), file=sys.stderr)


def write_record(path: Any, settings: dict[str, Any], record: dict[str, Any], **extra: Any) -> None:
    """Write ``settings`` (the command's arguments, without handler, command and out), then ``record``, then
    ``extra`` as one JSON object to ``path`` (atomically; later keys win)."""
    skip = ("handler", "command", "out", "written_folder")
    write_json(path, {**{k: v for k, v in settings.items() if k not in skip}, **record, **extra})
