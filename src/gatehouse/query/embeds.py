"""Which relation an embed means (``select=...,target!hint(...)``), and PostgREST's answer when none or several fit.

The rules are PostgREST's (:func:`gatehouse.contracts.relations.selects`): the target names a contract, or
a foreign key or its column; the hint names a key, a column or a junction. Only relations the calling app may
see are looked at: their target is readable by it, and so is the junction of one that goes through a
junction (its query reads the junction's view as the app's role, which needs the grant). A relation the app
may not see is the same as one that does not exist: the 400 below, never a hint or detail that names it.

* none fits: 400 ``PGRST200`` in PostgREST's words, with a "Perhaps you meant" hint when a relation the app
  may see leads to a contract whose name is close to the one asked for;
* several fit: 300 ``PGRST201``, ``details`` listing each (cardinality, embedding, relationship as PostgREST
  writes them) and a hint listing one ``target!hint`` for each.

This runs while a query is compiled, which happens once per query *shape* (``query/plans.py`` caches the SQL),
with the relations the schema cache built at start: no database round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

from gatehouse.contracts.relations import Relation, distinct_hints, selects
from gatehouse.errors import AmbiguousRelationship, RelationshipNotFound
from gatehouse.query.suggest import closest_other
from gatehouse.schema_cache import ApiSchema


def visible(relation: Relation, readable: frozenset[str]) -> bool:
    """May an app that reads ``readable`` embed along the relation?"""
    junction = relation.junction
    return relation.target in readable and (junction is None or junction.contract in readable)


def find_relation(schema: ApiSchema, readable: frozenset[str], parent: str, target: str, hint: str | None,
                  profile: str) -> Relation:
    """The one relation from ``parent`` that ``target`` (``target!hint``) means, among those the app sees;
    ``profile`` is the schema a PGRST200 names."""
    offered = [r for r in schema.relations_from(parent) if visible(r, readable)]
    candidates = [r for r in offered if selects(r, target, hint)]
    if not candidates:
        raise not_found(profile, parent, target, hint, offered)
    if len(candidates) > 1:
        raise ambiguous(parent, target, candidates)
    return candidates[0]


def not_found(profile: str, parent: str, target: str, hint: str | None,
              offered: Sequence[Relation]) -> RelationshipNotFound:
    """PostgREST's 400 for an embed that fits no relation. Its hint suggests a close target among the parent's
    relations (none when the name is one of them: then the hint was wrong), or is null."""
    using = f"' using the hint '{hint}" if hint is not None else ""
    suggestion = closest_other(target, (r.target for r in offered)) if offered else None
    return RelationshipNotFound(
        f"Could not find a relationship between '{parent}' and '{target}' in the schema cache",
        details=f"Searched for a foreign key relationship between '{parent}' and '{target}{using}' in the schema "
                f"'{profile}', but no matches were found.",
        hint=f"Perhaps you meant '{suggestion}' instead of '{target}'." if suggestion else None,
    )


def describe(relation: Relation) -> dict[str, str]:
    """One candidate of a 300, as PostgREST lists it."""
    return {"cardinality": relation.kind, "embedding": f"{relation.source} with {relation.target}",
            "relationship": relation.relationship}


def ambiguous(parent: str, target: str, candidates: Sequence[Relation]) -> AmbiguousRelationship:
    """PostgREST's 300 for an embed that fits several relations: each candidate, and a hint naming an embed
    that picks each one (the key's or junction's name, as PostgREST suggests, unless another candidate answers
    to it too: then a column only it answers to)."""
    choices = ", ".join(f"'{r.target}!{h}'" for r, h in zip(candidates, distinct_hints(candidates), strict=True))
    return AmbiguousRelationship(
        f"Could not embed because more than one relationship was found for '{parent}' and '{target}'",
        candidates=[describe(r) for r in candidates],
        hint=f"Try changing '{target}' to one of the following: {choices}. "
             "Find the desired relationship in the 'details' key.",
    )
