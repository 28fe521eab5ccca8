"""What ``gatehouse check`` reports: a :class:`Finding` says what is wrong, where, and what to do.

Its own module so the checks that live beside :mod:`gatehouse.check` (:mod:`gatehouse.check_lineage`) make
findings of the same kind without importing the module that calls them: the imports point one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    code: str
    message: str
    contract: str | None = None
    """The contract version's label (``products.v1``), when the finding is about one."""
    file: str | None = None
    """Relative to the project folder."""
    hint: str | None = None
