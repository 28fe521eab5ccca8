"""The checks of ``gatehouse check`` that follow each contract's lineage to the base tables of its database.

* **GHC055**: a ``-- not null:`` promise the tables do not keep. The column it names comes from a base column
  without ``NOT NULL``, or through the nullable side of an outer join, so clients can get the null the
  contract promised never to send (:func:`gatehouse.contracts.signature.nullable_promises`, the same
  derivation that makes the live signature nullable, hence GHC011 for a released version).
* **GHC056**: an embed that is ambiguous. When a contract has more than one relation to the same target in
  an API version, ``select=*,target(*)`` answers 300 and clients must name one (``target!fk_name(*)``). The
  relations are built per API version exactly as the server builds them (:mod:`gatehouse.contracts.ambiguity`,
  which ``migrate plan`` asks too), so what passes here is what the server answers. It is an *error* when it
  breaks a released API version (the contract version was released with a single relation to that target,
  so an app's query that worked there now fails), a *warning* otherwise (only unreleased API versions are
  ambiguous, or no app could embed the target by its name alone).
"""

from __future__ import annotations

from collections.abc import Mapping

from gatehouse.check_findings import Finding
from gatehouse.contracts.ambiguity import Ambiguity, find_ambiguities
from gatehouse.contracts.lockfile import Lock
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.signature import LiveSignatures, NullablePromise, live_labels
from gatehouse.db import Connection
from gatehouse.db.catalog import load_constraints
from gatehouse.project import Project


def _file(project: Project, contract: ContractVersion) -> str:
    try:
        return contract.path.resolve().relative_to(project.root.resolve()).as_posix()
    except ValueError:
        return str(contract.path)


def _next_version(project: Project, lock: Lock | None) -> int:
    return max(lock.released_api_version if lock else 0, project.versions.newest) + 1


# --- GHC055: a promise the tables do not keep -----------------------------------------------------------


def _promise_finding(project: Project, contract: ContractVersion, promise: NullablePromise,
                     lock: Lock | None) -> Finding:
    released = lock is not None and lock.get(contract.label) is not None
    where = (f"in a new contract version ({contract.name}.v{_next_version(project, lock)}.sql)" if released
             else "in this file")
    return Finding("error", "GHC055", f"{contract.label}: `-- not null:` promises {promise.column}, but it can be "
                   f"null: it {promise.why}", contract=contract.label, file=_file(project, contract),
                   hint=promise.fix(where))


# --- GHC056: an embed that is ambiguous -----------------------------------------------------------------


def _ambiguity_finding(project: Project, contract: ContractVersion, ambiguity: Ambiguity) -> Finding:
    target = ambiguity.target
    versions = ", ".join(f"v{n}" for n in ambiguity.api_versions)
    message = (f"{contract.label}: embedding {target} is ambiguous in API {versions}: {len(ambiguity.relations)} "
               f"relations lead there ({ambiguity.described})")
    file = _file(project, contract)
    if ambiguity.breaking:
        released = ", ".join(f"v{n}" for n in ambiguity.broken_versions)
        hint = (f"released with one relation to {target}, so an app's `select=*,{target}(*)` in released API "
                f"{released} now answers 300: remove the relation added since (a foreign key, or a [[relations]] "
                f"entry in gatehouse.toml, between the columns of {contract.name} and {target}); new queries can "
                f"pick one: {ambiguity.choices}")
        return Finding("error", "GHC056", message, contract=contract.label, file=file, hint=hint)
    return Finding("warning", "GHC056", message, contract=contract.label, file=file,
                   hint=f"`select=*,{target}(*)` answers 300 there: clients must pick one: {ambiguity.choices}")


# --- together -------------------------------------------------------------------------------------------


async def lineage_findings(conn: Connection, project: Project, database: str, lock: Lock | None,
                           signatures: LiveSignatures) -> list[Finding]:
    """GHC055 and GHC056 for the live contract versions of ``database``, on the owner connection ``conn``;
    the broken promises are the ones :func:`~gatehouse.contracts.signature.live_signatures` found."""
    live = live_labels(project)
    contracts: Mapping[str, ContractVersion] = {
        c.label: c for c in project.contracts if c.database == database and c.label in live
    }
    findings = [_promise_finding(project, contracts[label], promise, lock)
                for label, promises in signatures.promises.items() if label in contracts
                for promise in promises]
    for ambiguity in find_ambiguities(project, database, await load_constraints(conn), lock):
        findings.append(_ambiguity_finding(project, contracts[ambiguity.label], ambiguity))
    return findings
