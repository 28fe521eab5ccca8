"""Embeds that are ambiguous, judged per API version as the server builds it, and whether one breaks an app.

When a contract has two or more relations to the same target in an API version, ``select=*,target(*)``
answers 300 there (PostgREST's PGRST201) and clients must name one (``target!hint(*)``). The relations
are those the server builds for that API version (:func:`gatehouse.contracts.signature.relations_by_api_version`,
identical relations merged into one, those through a junction included), and the ones counted are those the
server takes for the target's name alone (:func:`gatehouse.contracts.relations.embeds_as`: from a contract to
itself, only the one-to-many side), so the verdict is what the server answers, version by version.

It cannot be read from a :class:`~gatehouse.contracts.shape.Signature`: a contract version served in
several API versions records the *union* of its relations over them, and a relation that only a newer,
unreleased contract makes possible (``orders.v4`` exposing ``gift_for``) would seem to make every version
ambiguous, although the older ones still answer 200. So the rule is per API version:

* **breaking**: in an API version ``N`` that is already released (``N`` ≤ the lock's newest released API
  version), contract version ``C`` has several relations to ``T`` while the lock recorded exactly one for
  ``C``: an app's ``select=*,T(*)``, which worked, now answers 300;
* **a warning** otherwise: only unreleased API versions are ambiguous (no app's query exists yet), or ``C``
  was released with none or several relations to ``T`` (nobody embedded it by name alone).

``gatehouse check`` (GHC056) and ``gatehouse migrate plan`` both ask :func:`find_ambiguities`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gatehouse.contracts.lockfile import Lock
from gatehouse.contracts.relations import Relation, distinct_hints, embeds_as
from gatehouse.contracts.shape import RelationRef
from gatehouse.contracts.signature import relations_by_api_version
from gatehouse.db.catalog import Constraint
from gatehouse.project import Project


@dataclass(frozen=True, slots=True)
class Ambiguity:
    """A contract version's embed of ``target`` that matches several relations in some API versions."""

    label: str
    """The contract version (``customer_summary.v1``)."""
    target: str
    relations: tuple[Relation, ...]
    """Every relation to ``target`` in the API versions where it is ambiguous (one per columns pair)."""
    hints: tuple[str, ...]
    """For each of :attr:`relations`, an ``!hint`` that picks it alone, in every one of those versions."""
    api_versions: tuple[int, ...]
    """The API versions where the embed is ambiguous."""
    broken_versions: tuple[int, ...] = ()
    """The released ones among them where an app's embed by name alone worked: empty when nothing broke."""
    released: RelationRef | None = None
    """The single relation to ``target`` the lock recorded, when it breaks."""

    @property
    def contract(self) -> str:
        return self.label.rpartition(".v")[0]

    @property
    def breaking(self) -> bool:
        return bool(self.broken_versions)

    @property
    def described(self) -> str:
        """``fk_a: customer_id → orders(user_id); fk_b: customer_id → orders(gift_for)``; one through a junction
        says so: ``id → tasks(id) through users_tasks``."""
        return "; ".join(f"{','.join(r.source_columns)} → {self.target}({','.join(r.target_columns)}) through "
                         f"{r.junction.contract}" if r.junction is not None else
                         f"{r.name}: {','.join(r.source_columns)} → {self.target}({','.join(r.target_columns)})"
                         for r in self.relations)

    @property
    def choices(self) -> str:
        """The embeds that pick each relation: ``orders!orders_gift_for_fkey(...), orders!user_id(...)``."""
        return ", ".join(f"{self.target}!{hint}(...)" for hint in self.hints)


def _released_relation(lock: Lock | None, label: str, target: str) -> RelationRef | None:
    """The lock's only relation from ``label`` to ``target``; None when not released, or none or several."""
    entry = lock.get(label) if lock else None
    if entry is None:
        return None
    found = [r for r in entry.signature.relations if r.target == target]
    return found[0] if len(found) == 1 else None


def _identity(relation: Relation) -> tuple[object, ...]:
    """The same relation in two API versions: its columns on both sides (and its junction's)."""
    j = relation.junction
    ends = (j.contract, j.source_columns, j.target_columns) if j is not None else ()
    return (relation.source_columns, relation.target_columns, *ends)


def find_ambiguities(project: Project, database: str, constraints: Iterable[Constraint],
                     lock: Lock | None) -> list[Ambiguity]:
    """Every (contract version, target) of ``database`` with several relations in some served API version,
    by label then target; ``constraints`` are the database's keys now (migrated or not, as the caller wants)."""
    ambiguous: dict[tuple[str, str], tuple[dict[tuple[object, ...], Relation], list[int]]] = {}
    for number, by_label in relations_by_api_version(project, database, constraints).items():
        for label, relations in by_label.items():
            by_target: dict[str, list[Relation]] = {}
            for relation in relations:
                if embeds_as(relation, relation.target):
                    by_target.setdefault(relation.target, []).append(relation)
            for target, candidates in by_target.items():
                if len(candidates) < 2:
                    continue
                found, numbers = ambiguous.setdefault((label, target), ({}, []))
                for relation in candidates:
                    found.setdefault(_identity(relation), relation)
                numbers.append(number)
    released_api = lock.released_api_version if lock else 0
    results = []
    for (label, target), (found, numbers) in sorted(ambiguous.items()):
        offered = tuple(sorted(found.values(), key=lambda r: (r.name, r.source_columns, r.target_columns)))
        was = _released_relation(lock, label, target)
        broken = tuple(n for n in numbers if n <= released_api) if was is not None else ()
        results.append(Ambiguity(label, target, offered, distinct_hints(offered), tuple(numbers), broken,
                                 was if broken else None))
    return results
