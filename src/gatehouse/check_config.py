"""``gatehouse check``'s findings about ``gatehouse.toml``: grants, their row filters, ``[[relations]]`` and
``[contracts.x]`` that name contracts or columns no served contract version has (GHC050 to GHC053). Each is
checked against every contract version an API version still serves, so a grant that fits ``v2`` but not a ``v1``
still served is found too.
"""

from __future__ import annotations

from gatehouse.check_findings import Finding, error
from gatehouse.config import ProjectConfig
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.versions import carry_forward
from gatehouse.errors import ApiError
from gatehouse.project import CONFIG_FILE
from gatehouse.query.row_filters import columns_of, parse_row_filter


def config_findings(config: ProjectConfig, contracts: list[ContractVersion]) -> list[Finding]:
    """Grants, row filters, relations and contract settings that name contracts or columns that do not exist."""
    findings: list[Finding] = []
    versions = carry_forward(contracts, config.retired_versions)
    live: dict[str, list[ContractVersion]] = {}
    for served in versions.served.values():
        for contract in served.values():
            if contract not in live.setdefault(contract.name, []):
                live[contract.name].append(contract)
    known = ", ".join(sorted(live)) or "none"
    for app_name, app in config.apps.items():
        for grant in app.grants:
            place = f"[apps.{app_name}] grant on {grant.contract!r}"
            if grant.contract not in live:
                findings.append(error("GHC050", f"{place}: {grant.contract!r} is not a contract", file=CONFIG_FILE,
                                      hint=f"known contracts: {known}"))
                continue
            if grant.filter is None:
                continue
            try:
                conditions = parse_row_filter(grant.filter)
            except (ValueError, ApiError) as exc:
                message = exc.message if isinstance(exc, ApiError) else str(exc)
                findings.append(error("GHC051", f"{place}: the filter cannot be read: {message}", file=CONFIG_FILE,
                                      hint='write it like a query string: "tenant_id=eq.{claims.tenant_id}"'))
                continue
            for contract in live[grant.contract]:
                unknown = sorted(columns_of(conditions) - set(contract.columns))
                if unknown:
                    findings.append(error("GHC051", f"{place}: the filter names {', '.join(unknown)}, not a column "
                                          f"of {contract.label}", contract=contract.label, file=CONFIG_FILE,
                                          hint=f"its columns: {', '.join(contract.columns)}"))
    for index, relation in enumerate(config.relations, start=1):
        for end in (relation.source, relation.target):
            name, column = end.split(".", 1)
            if name not in live:
                findings.append(error("GHC052", f"[[relations]] #{index} names {name!r}, which is not a contract",
                                      file=CONFIG_FILE, hint=f"known contracts: {known}"))
            elif missing := [c.label for c in live[name] if column not in c.columns]:
                findings.append(error("GHC052", f"[[relations]] #{index} names {end}, but {', '.join(missing)} "
                                      f"has no column {column!r}", file=CONFIG_FILE))
    for name in config.contracts:
        if not any(c.name == name for c in contracts):
            findings.append(error("GHC053", f"[contracts.{name}] configures {name!r}, which is not a contract",
                                  file=CONFIG_FILE, hint=f"known contracts: {known}"))
    return findings
