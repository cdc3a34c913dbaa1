"""docker-compose.yml, .env.example and the Dockerfile, checked offline: schema, commands, settings, secrets."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter

from bots.cli import build_parser
from bots.logs import SECRET
from bots.settings import Settings
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
SETTINGS = {name.upper(): field for name, field in Settings.model_fields.items()}
INTERPOLATED = re.compile(r"\$\{(\w+)(?:[:?\-+][^}]*)?\}")
SECRET_SETTINGS = {name for name, field in SETTINGS.items() if "SecretStr" in str(field.annotation)}
URL_PASSWORD = re.compile(r"://[^:/@\s]+:(.+)@")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def pioneer_services(compose: dict) -> dict:
    """Services that run this project's image (the rest are redis, postgres, flower)."""
    return {name: s for name, s in compose["services"].items() if str(s.get("image", "")).startswith("pioneer:")}


def env_example() -> dict[str, str]:
    """NAME -> documented value, from both set and commented-out `NAME=value` lines."""
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            entries[match[1]] = match[2].strip().strip('"')
    return entries


def test_compose_file_matches_the_compose_spec_schema():
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_topology_services_profiles_and_dependencies(compose):
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker", "worker-cpu", "discord", "slack", "flower"} <= set(services)
    assert "volatile-lru" in services["redis"]["command"] and "--appendonly" in services["redis"]["command"]
    assert services["postgres"]["image"].startswith("postgres:15")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    for name in ("redis", "postgres"):
        assert "healthcheck" in services[name]
    assert services["migrate"]["restart"] == "no"
    for name in ("discord", "slack"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["profiles"] == [name]
    assert services["worker-cpu"]["profiles"] == ["cpu"] and services["flower"]["profiles"] == ["flower"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name, service in pioneer_services(compose).items():
        assert service["env_file"] == ".env" and service["restart"] in ("unless-stopped", "no"), name
        assert service["environment"]["PIONEER_DATA_DIR"] == "/data", name
        assert "pioneer-data:/data" in service["volumes"], name
        if service["restart"] != "no":
            assert "healthcheck" in service and "/healthz" in " ".join(service["healthcheck"]["test"]), name
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_every_command_is_a_real_pioneer_subcommand(compose):
    parser = build_parser()
    commands = {name: service["command"] for name, service in pioneer_services(compose).items()}
    assert set(commands) == {"migrate", "worker", "worker-cpu", "discord", "slack"}
    for name, command in commands.items():
        args = parser.parse_args(command)  # argparse exits (SystemExit) on anything it doesn't know
        assert args.command == command[0], name


def test_every_variable_passed_is_a_real_setting(compose):
    for name, service in pioneer_services(compose).items():
        unknown = set(service["environment"]) - set(SETTINGS)
        assert not unknown, f"{name} passes variables that are no setting: {unknown}"


def test_env_example_documents_every_setting_with_its_default_and_nothing_else():
    documented = env_example()
    compose_variables = set(INTERPOLATED.findall(COMPOSE.read_text()))
    unknown = set(documented) - set(SETTINGS) - compose_variables
    assert not unknown, f".env.example names what is no setting nor compose variable: {unknown}"
    missing = set(SETTINGS) - set(documented)
    assert not missing, f".env.example does not document {missing}"
    assert compose_variables <= set(documented) | set(SETTINGS)
    worker_fields = WorkerSettings.model_fields
    for name, field in SETTINGS.items():
        value = documented[name]
        defaults = [field.default]
        if name.lower() in worker_fields:
            defaults.append(worker_fields[name.lower()].default)  # METRICS_PORT: 9100 for workers, 0 for front-ends
        if field.default is None or field.default == []:
            assert value == "", f"{name}: unset by default, documented as {value!r}"
        elif isinstance(field.default, Path):
            assert Path(value).expanduser() == field.default, name
        else:
            assert TypeAdapter(field.annotation).validate_python(value, strict=False) in defaults, \
                f"{name}: documented {value!r}, default {field.default!r}"


def test_no_secret_values_in_the_compose_file_or_the_example(compose):
    for path in (COMPOSE, ENV_EXAMPLE):
        for line in path.read_text().splitlines():
            assert not SECRET.search(line), f"a token or key in {path.name}: {line}"
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRET_SETTINGS or "PASSWORD" in key:
                assert value is None or INTERPOLATED.fullmatch(str(value)), f"{name}: {key} has a literal secret"
            for password in URL_PASSWORD.findall(str(value)):
                assert INTERPOLATED.fullmatch(password), f"{name}: {key} has a literal password"
    secrets_set = {k: v for k, v in env_example().items() if (k in SECRET_SETTINGS or "PASSWORD" in k) and v}
    assert not secrets_set, f".env.example sets secret values: {secrets_set}"


def test_dockerfile_targets_run_pioneer_as_a_non_root_user():
    stages, current = {}, None
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            current = words[-1] if len(words) >= 4 and words[-2].upper() == "AS" else words[1]
            stages[current] = []
        elif current:
            stages[current].append((words[0].upper(), " ".join(words[1:])))
    for target in ("cpu", "gpu"):
        instructions = dict(stages[target])
        assert instructions.get("USER") not in (None, "root", "0"), f"{target} runs as root"
        assert instructions.get("ENTRYPOINT") == '["pioneer"]', target
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)
