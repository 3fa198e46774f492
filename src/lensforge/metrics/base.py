"""What every task's metrics have in common: typed fields, one headline number, and the
JSON view that ``metrics.json`` and ``lensforge.json`` hold.

Each task's metrics are a frozen dataclass (:class:`~lensforge.metrics.classification.ClassificationMetrics`,
:class:`~lensforge.metrics.classification.MultilabelMetrics`,
:class:`~lensforge.metrics.detection.DetectionMetrics`). They also read as a mapping with the
JSON keys (``m["accuracy"]``, ``m.get("map50")``), so files written before they were typed,
and code that reads those files, see the same keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Self


class Metrics(Mapping[str, Any]):
    """Base of the per-task metric dataclasses.

    Subclasses set ``HEADLINE`` (the JSON key of the number a model is judged by) and may set
    ``JSON_KEYS`` to rename fields in the JSON view (a field cannot be called ``mAP`` and
    ``map`` in two classes without the console listing both: the field is ``map`` everywhere,
    the multi-label JSON keeps its historical ``mAP``). Fields that are None and listed in
    ``OPTIONAL`` are left out of the JSON view, as they always were.
    """

    HEADLINE: ClassVar[str]
    JSON_KEYS: ClassVar[dict[str, str]] = {}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"evaluated_on"})

    @property
    def headline(self) -> tuple[str, float | None]:
        """(name, value) of the one number this model is judged by; value None when undefined."""
        value = self.to_dict().get(self.HEADLINE)
        return self.HEADLINE, None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (plain float/int/list/dict/None), in the field order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            out[self.JSON_KEYS.get(f.name, f.name)] = value
        return out

    def numbers(self) -> dict[str, float | int]:
        """The scalar numbers only: what a bundle's ``lensforge.json`` keeps (tables go to ``eval/``)."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def with_source(self, evaluated_on: str) -> Self:
        """A copy that says which images it was computed on (``"the test split saved at training time"``)."""
        return dataclasses.replace(self, evaluated_on=evaluated_on)  # type: ignore[type-var]

    # -- the mapping view (JSON keys) ----------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
