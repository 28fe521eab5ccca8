"""API versions by carry-forward.

API version ``vN`` serves every contract at its newest version ``<= N``. So adding ``products.v3.sql``
creates API ``v3`` in which ``products`` is v3 and every other contract is whatever it was in ``v2``;
``v1`` and ``v2`` stay exactly as they were. Each API version becomes one PostgreSQL schema, ``api_vN``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gatehouse.contracts.model import ContractVersion


def schema_name(api_version: int) -> str:
    return f"api_v{api_version}"


@dataclass(frozen=True, slots=True)
class ApiVersions:
    """Which contract version each API version serves: ``served[N][name]``."""

    served: Mapping[int, Mapping[str, ContractVersion]]
    """Live versions only: a retired version serves nothing, and its views are dropped."""
    retired: frozenset[int] = frozenset()

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(sorted(self.served))

    @property
    def newest(self) -> int:
        return max(self.served) if self.served else 0

    def resolve(self, api_version: int, contract: str) -> ContractVersion | None:
        return self.served.get(api_version, {}).get(contract)

    def views(self) -> Iterable[tuple[int, ContractVersion]]:
        """Every (API version, contract version) pair: one view each."""
        for number in self.numbers:
            for contract in sorted(self.served[number].values(), key=lambda c: c.name):
                yield number, contract


def carry_forward(contracts: Iterable[ContractVersion], retired: frozenset[int] = frozenset()) -> ApiVersions:
    by_name: dict[str, dict[int, ContractVersion]] = {}
    for contract in contracts:
        by_name.setdefault(contract.name, {})[contract.version] = contract
    newest = max((v for versions in by_name.values() for v in versions), default=0)
    served: dict[int, dict[str, ContractVersion]] = {}
    for api_version in range(1, newest + 1):
        current: dict[str, ContractVersion] = {}
        for name, versions in by_name.items():
            eligible = [v for v in versions if v <= api_version]
            if eligible:
                current[name] = versions[max(eligible)]
        if api_version not in retired:
            served[api_version] = current
    return ApiVersions(served=served, retired=retired)
