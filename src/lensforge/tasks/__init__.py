"""One module per task; every stage asks the task what differs (see :mod:`lensforge.tasks.base`).

Adding a task (segmentation, say) means adding one module here with a :class:`Task` subclass
and listing it in ``TASK_TYPES``.
"""

from __future__ import annotations

from lensforge.errors import ConfigError
from lensforge.tasks.base import Built, Parity, Scored, Task, TrainData
from lensforge.tasks.classify import Classify, Multilabel
from lensforge.tasks.detect import Detect

TASK_TYPES: tuple[type[Task], ...] = (Classify, Multilabel, Detect)
_TASKS: dict[str, Task] = {t.name: t() for t in TASK_TYPES}


def get_task(name: str) -> Task:
    """The task called ``name`` ("classify", "multilabel", "detect")."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; use one of {', '.join(_TASKS)}") from None


__all__ = ["Built", "Parity", "Scored", "Task", "TrainData", "TASK_TYPES", "get_task"]
