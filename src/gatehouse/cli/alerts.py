"""``gatehouse alerts``: the ``[alerts]`` rules as Prometheus rules, and a test notification to each webhook."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from gatehouse.cli.common import fail, out, project_here, run, run_sync
from gatehouse.config_alerts import AlertsConfig

alerts_app = typer.Typer(help="Alerts: the rules of gatehouse.toml as Prometheus rules, and testing the webhooks.",
                         no_args_is_help=True)


@alerts_app.command("prometheus")
def alerts_prometheus(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the rules to this file "
                                                "(default: print them).")] = None,
) -> None:
    """Write the alert rules of gatehouse.toml as Prometheus alerting rules (YAML), over gatehouse's /metrics."""
    from gatehouse.observe.alert_prometheus import prometheus_rules
    from gatehouse.observe.alerts import check_rules

    project = project_here()
    run_sync(lambda: check_rules(project))
    text = prometheus_rules(project.config.alerts, project.name)
    if output is None:
        print(text, end="")
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}") from None
    count = len(project.config.alerts.rules)
    out.print(f"wrote {count} rule{'s' if count != 1 else ''} to {output}")


@alerts_app.command("test")
def alerts_test(
    webhook: Annotated[str | None, typer.Option(help="Only this webhook (default: every one).")] = None,
) -> None:
    """Send a test notification to each alert webhook of gatehouse.toml (one attempt each) and say how it went."""
    project = project_here()
    hooks = project.config.alerts.webhooks
    if not hooks:
        raise fail("[alerts.webhooks] has no webhook to test",
                   hint='add one, e.g. [alerts.webhooks.ops] url = "env:SLACK_WEBHOOK_URL" format = "slack"')
    if webhook is not None and webhook not in hooks:
        raise fail(f"there is no webhook {webhook!r} in [alerts.webhooks]", hint=f"there are: {', '.join(hooks)}")
    names = [webhook] if webhook is not None else list(hooks)
    results = run(_send_tests(project.name, project.config.alerts, names))
    failed = 0
    for name, (delivered, outcome) in results.items():
        if delivered:
            out.print(f"[green]ok[/]    {name} ({hooks[name].format}): {outcome}")
        else:
            failed += 1
            out.print(f"[red]fail[/]  {name} ({hooks[name].format}): {outcome}")
    if failed:
        raise typer.Exit(1)


async def _send_tests(project_name: str, config: AlertsConfig, names: list[str]) -> dict[str, tuple[bool, str]]:
    import asyncio

    import httpx

    from gatehouse.observe.alert_sinks import Webhook, trial_notification

    async with httpx.AsyncClient(follow_redirects=False) as client:
        hooks = {name: Webhook(name, config.webhooks[name], client) for name in names}
        now = datetime.now(UTC)
        answers = await asyncio.gather(*(hook.send(trial_notification(project_name, name, now), retries=0)
                                         for name, hook in hooks.items()))
    return {name: (delivered, outcome) for name, (delivered, outcome, _) in zip(hooks, answers, strict=True)}
