"""``[console]`` in ``gatehouse.toml``: whether the console is on and the tokens that sign an admin in.

Kept apart from the console's code so that :mod:`gatehouse.config` can import it without the web parts.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field

from gatehouse.secrets import SecretRef


class ConsoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | None = Field(
        default=None, description="serve /console on the admin port; default: only when the admin port listens "
                                  "on a loopback address (127.0.0.1, ::1, localhost)")
    admin_token: SecretRef = Field(default=None, description="'env:VAR' holding the token of admins who may "
                                                             "change things (create and revoke keys)")
    readonly_token: SecretRef = Field(default=None, description="'env:VAR' holding the token of admins who may "
                                                                "look but not change anything")
    session_minutes: int = Field(default=480, ge=1, le=10_080, description="a signed-in session ends after this")
    sign_in_failures_per_minute: int = Field(default=10, ge=1, le=10_000,
                                             description="failed sign-ins per client address per minute (429 "
                                                         "beyond)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def console_enabled(config: ConsoleConfig, admin_host: str) -> bool:
    """On when configured so, else only on a loopback admin address: a console reachable from the network is
    a decision someone writes down (``enabled = true``), never a default."""
    return config.enabled if config.enabled is not None else is_loopback(admin_host)
