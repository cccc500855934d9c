"""The production-shaped stack: docker-compose.yml, Dockerfile, .dockerignore.

No Docker engine runs here, so the stack is validated, not started: the real
``docker-compose`` validator must accept the file (and reject broken copies of
it, so this test can fail), and the file's content is checked for what
docs/deployment.md promises: Kafka in KRaft mode with auto-create off, Redis
with AOF on a volume, healthchecks and health-gated start order, and liftrec
services wired through the environment to settings that really parse.

``docker-compose`` comes from Debian: ``scripts/install-system-deps.sh``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from features.kafka import topic_specs
from features.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
LIFTREC_SERVICES = ("init", "worker", "api", "trainer")

#: LIFTREC_* variables the compose file sets that are not (yet) fields of
#: features.settings.Settings; any other unknown name is a typo.
PENDING_SETTINGS = {"LIFTREC_REGISTRY_DIR"}


def _compose_bin() -> str:
    path = shutil.which("docker-compose")
    assert path, "docker-compose is not installed: run scripts/install-system-deps.sh"
    return path


def _run_compose(compose_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A minimal environment: no stray LIFTREC_*/KAFKA_* of the caller's shell
    # may change the interpolated defaults under test.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [_compose_bin(), "-f", str(compose_file), *args],
        capture_output=True, text=True, env=env, cwd=compose_file.parent, timeout=60,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors merged, defaults interpolated)."""
    proc = _run_compose(COMPOSE_FILE, "--profile", "train", "config")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def services(resolved: dict[str, Any]) -> dict[str, Any]:
    return resolved["services"]


def _env_of(services: dict[str, Any], name: str) -> dict[str, str]:
    return {k: str(v) for k, v in services[name].get("environment", {}).items()}


# -- the validator -----------------------------------------------------------


def test_compose_config_is_valid() -> None:
    proc = _run_compose(COMPOSE_FILE, "config", "-q")
    assert proc.returncode == 0, proc.stderr
    proc = _run_compose(COMPOSE_FILE, "--profile", "train", "config", "-q")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("needle", "replacement", "error"),
    [
        # a misspelt healthcheck option
        ("      interval: 5s\n", "      intervall: 5s\n", "intervall"),
        # a dependency on a service that does not exist
        ("      init:\n        condition: service_completed_successfully\n",
         "      initt:\n        condition: service_completed_successfully\n", "initt"),
        # a replica count that is not a number
        ("replicas: ${LIFTREC_WORKER_REPLICAS:-2}", "replicas: two", "replicas"),
    ],
    ids=["bad-key", "unknown-dependency", "bad-replicas"],
)
def test_validator_rejects_broken_copy(tmp_path: Path, needle: str, replacement: str, error: str) -> None:
    text = COMPOSE_FILE.read_text()
    assert needle in text, f"fixture text {needle!r} no longer in docker-compose.yml"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(needle, replacement, 1))
    proc = _run_compose(broken, "config", "-q")
    assert proc.returncode != 0, f"docker-compose accepted a broken file ({replacement!r})"
    assert error in proc.stderr, proc.stderr


def test_raw_yaml_matches_resolved(services: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert set(raw["services"]) == set(services)
    assert set(services) == {"kafka", "redis", "init", "worker", "api", "trainer"}
    assert set(raw["volumes"]) >= {"kafka-data", "redis-data", "registry"}


# -- Kafka ---------------------------------------------------------------------


def test_kafka_runs_kraft_single_node(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env_of(services, "kafka")
    assert not any("ZOOKEEPER" in k for k in env), "KRaft mode needs no ZooKeeper settings"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{node_id}@kafka:9093"]
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    assert listeners[controller] == ":9093"
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    assert controller not in advertised
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "CLUSTER_ID must be a base64 UUID"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    data_dir = env["KAFKA_LOG_DIRS"]
    assert any(v.split(":")[1] == data_dir and v.startswith("kafka-data:") for v in kafka["volumes"])


# -- Redis ---------------------------------------------------------------------


def test_redis_has_aof_on_a_volume(services: dict[str, Any]) -> None:
    redis_svc = services["redis"]
    image = redis_svc["image"]
    assert image.startswith("redis:7"), image
    cmd = redis_svc["command"]
    assert cmd[0] == "redis-server"
    opts = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert opts["--appendonly"] == "yes"
    assert opts["--appendfsync"] in {"everysec", "always"}
    data_dir = opts["--dir"]
    assert f"redis-data:{data_dir}" in [v.rsplit(":rw", 1)[0] for v in redis_svc["volumes"]]


def test_redis_keeps_full_covis_sets_compact(services: dict[str, Any]) -> None:
    """Redis 7's listpacks cost no more CPU than skiplists for 100-member sets (docs/deployment.md)."""
    from features.store import COVIS_CAP

    cmd = services["redis"]["command"]
    opts = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert int(opts["--zset-max-listpack-entries"]) >= COVIS_CAP


# -- health, order, restarts, limits ---------------------------------------------


@pytest.mark.parametrize("name", ["kafka", "redis", "worker", "api"])
def test_long_running_services_have_healthchecks(services: dict[str, Any], name: str) -> None:
    check = services[name]["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert len(check["test"]) > 1
    for key in ("interval", "timeout", "retries"):
        assert key in check, f"{name} healthcheck lacks {key}"


@pytest.mark.parametrize("name", ["init", "worker", "api", "trainer"])
def test_start_is_gated_on_healthy_servers(services: dict[str, Any], name: str) -> None:
    deps = services[name]["depends_on"]
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["redis"]["condition"] == "service_healthy"
    if name in {"worker", "api"}:
        assert deps["init"]["condition"] == "service_completed_successfully"


def test_restart_policies_and_limits(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        expected = "no" if name in {"init", "trainer"} else "unless-stopped"
        assert svc["restart"] == expected, name
        limits = svc["deploy"]["resources"]["limits"]
        assert limits.get("cpus") and limits.get("memory"), name


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert worker["command"][:2] == ["liftrec", "worker"]
    assert worker["deploy"]["replicas"] >= 1
    # a fixed name or a published port would make a second replica collide
    assert "container_name" not in worker
    assert "ports" not in worker


def test_commands_and_profiles(services: dict[str, Any]) -> None:
    assert services["init"]["command"] == ["liftrec", "up"]
    assert services["api"]["command"] == ["liftrec", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert services["trainer"]["command"][:2] == ["liftrec", "train"]
    assert services["trainer"]["profiles"] == ["train"]
    for name in ("kafka", "redis", "init", "worker", "api"):
        assert "profiles" not in services[name], f"{name} must start by default"


def test_registry_volume_shared_read_only(services: dict[str, Any]) -> None:
    assert "registry:/registry:rw" in services["trainer"]["volumes"] or \
        "registry:/registry" in services["trainer"]["volumes"]
    for name in ("worker", "api"):
        assert "registry:/registry:ro" in services[name]["volumes"], name


def test_liftrec_services_share_one_dockerfile(services: dict[str, Any]) -> None:
    images = {services[n]["image"] for n in LIFTREC_SERVICES}
    assert len(images) == 1
    for name in LIFTREC_SERVICES:
        build = services[name]["build"]
        assert Path(build["context"]).resolve() == ROOT
        assert build["dockerfile"] == "Dockerfile"


# -- environment wiring ------------------------------------------------------------


@pytest.mark.parametrize("name", LIFTREC_SERVICES)
def test_env_wires_settings(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env_of(services, name)
    assert env["KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    unknown = {
        k for k in env
        if k.startswith("LIFTREC_") and k.removeprefix("LIFTREC_").lower() not in Settings.model_fields
    } - PENDING_SETTINGS
    assert not unknown, f"LIFTREC_* variables that no setting reads: {sorted(unknown)}"

    for key in [k for k in os.environ if k.startswith("LIFTREC_")] + ["KAFKA_BOOTSTRAP", "REDIS_URL"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.redis_url == "redis://redis:6379/0"
    assert topic_specs(settings) == {"liftrec.events": 4, "liftrec.events.dlq": 1, "liftrec.catalog": 1}


# -- commands and routes the compose file relies on ---------------------------------

#: Services whose command must exist in the CLI today. ``trainer`` joins once
#: ``liftrec train`` is registered in liftrec/cli.py.
CLI_CHECKED_SERVICES = ("init", "worker", "api")


@pytest.mark.parametrize("name", CLI_CHECKED_SERVICES)
def test_service_command_exists_in_cli(services: dict[str, Any], name: str) -> None:
    import typer.main

    from liftrec.cli import app

    command = services[name]["command"]
    assert command[0] == "liftrec"
    group = typer.main.get_command(app)
    verb = group.commands.get(command[1])  # type: ignore[attr-defined]
    assert verb is not None, f"`liftrec {command[1]}` ({name}) is not a CLI command"
    known = {opt for param in verb.params for opt in getattr(param, "opts", [])}
    used = {arg for arg in command[2:] if arg.startswith("--")}
    assert used <= known, f"{name}: options {sorted(used - known)} unknown to `liftrec {command[1]}`"


def test_api_healthcheck_hits_a_real_route(services: dict[str, Any]) -> None:
    from serving.api import health_router

    code = services["api"]["healthcheck"]["test"][-1]
    match = re.search(r"request\('GET', '([^']+)'\)", code)
    assert match, code
    assert match.group(1) in {route.path for route in health_router.routes}
    port = re.search(r"HTTPConnection\('127.0.0.1', (\d+)", code)
    assert port and services["api"]["command"][-1] == port.group(1)


def test_worker_healthcheck_port_matches_its_web_port(services: dict[str, Any]) -> None:
    command = services["worker"]["command"]
    web_port = command[command.index("--web-port") + 1]
    code = services["worker"]["healthcheck"]["test"][-1]
    assert f"HTTPConnection('127.0.0.1', {web_port}," in code


# -- Dockerfile / .dockerignore ----------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    instr = _dockerfile_instructions()
    args = dict(rest.split("=", 1) for op, rest in instr if op == "ARG" and "=" in rest)
    froms = [rest.replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", "")) for op, rest in instr if op == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    users = [rest for op, rest in instr if op == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the runtime image must not run as root"
    copied = {rest.split()[0].rstrip("/") for op, rest in instr if op == "COPY" and "--from" not in rest}
    assert "pyproject.toml" in copied
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the image"


def test_dockerignore_keeps_context_small() -> None:
    entries = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".liftrec"} <= entries
    for needed in ("pyproject.toml", "features", "liftrec"):
        assert needed not in entries
