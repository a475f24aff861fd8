"""The files under deploy/: they parse, run commands that exist, and keep the operational rules.

No Docker or Kubernetes here: the files are checked by reading them, and
tests/integration/test_topology.py runs the compose topology's commands as local processes.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from worker.cli import main
from worker.settings import Settings, read_env_file

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
EXAMPLE_ENV = ROOT / "config" / "example.env"

#: the variables of SPEC §7 (and the extra ones settings.py reads) that config/example.env documents
SPEC_VARIABLES = (
    "TPNS_ACCESS_ID", "TPNS_SECRET_KEY", "TPNS_SECRET_KEY_FILE", "TPNS_REGION", "TPNS_BASE_URL",
    "TPNS_AUTH", "REDIS_URL", "TPNS_DATA_DIR", "CELERY_BROKER_URL", "TPNS_REDIS_PREFIX",
    "TPNS_MAX_ITEMS_PER_CALL", "TPNS_LINGER_MS", "TPNS_HTTP_TIMEOUT_S", "TPNS_LEASE_S",
    "TPNS_MAX_CALLS_PER_S", "TPNS_MAX_ATTEMPTS", "TPNS_MAX_AGE_S", "TPNS_PAUSE_S",
    "TPNS_STATUS_TTL_S", "TPNS_APPS", "TPNS_DEFAULT_APP", "TPNS_API_TOKEN", "TPNS_LOG_FORMAT",
    "TPNS_MAX_PENDING", "TPNS_ENQUEUE_MIN_REPLICAS", "TPNS_ENQUEUE_WAIT_MS", "TPNS_EVENTS_MAXLEN",
    "TPNS_VERIFY", "TPNS_VERIFY_DELAY_MS", "TPNS_VERIFY_TIMEOUT_S", "TPNS_MAX_IN_FLIGHT",
    "TPNS_STATUS_DETAIL_S",
)


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name, encoding="utf-8")
    return parser


def unit_names() -> list[str]:
    return sorted(p.name for p in SYSTEMD.glob("*.service"))


def as_argv(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("containers", [])


def exec_commands(value: Any) -> Iterator[list[str]]:
    """Every ``command:`` list and ``exec.command`` anywhere in a parsed YAML document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("command", "test") and isinstance(item, list | str):
                argv = as_argv(item)
                yield argv[1:] if argv[:1] in (["CMD"], ["CMD-SHELL"]) else argv
            else:
                yield from exec_commands(item)
    elif isinstance(value, list):
        for item in value:
            yield from exec_commands(item)


def tpns_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after ``tpns-batcher``) for every tpns-batcher command the deploy files run."""
    found: list[tuple[str, list[str]]] = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            for argv in exec_commands(doc):
                if argv and Path(argv[0]).name == "tpns-batcher":
                    found.append((path.name, argv[1:]))
    for name in unit_names():
        for key, value in unit(name)["Service"].items():
            if key.startswith("Exec"):
                for match in re.finditer(r"\S*/tpns-batcher (\w[\w-]*(?: --?[\w-]+)*)", value):
                    found.append((name, match.group(1).split()))
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    for line in re.findall(r'^(?:HEALTHCHECK.*CMD|\s+CMD|CMD) (\[.*\])$', dockerfile, re.M):
        argv = yaml.safe_load(line)
        found.append(("Dockerfile", argv[1:]))
    return found


def runs_beat(argv: list[str]) -> bool:
    """Whether a command schedules the sweeps: a worker without --no-beat, or celery beat."""
    if Path(argv[0]).name == "tpns-batcher" and argv[1:2] == ["worker"]:
        return "--no-beat" not in argv
    return Path(argv[0]).name == "celery" and "beat" in argv


# -- everything parses, every command exists -------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_tpns_commands_exist_in_the_cli() -> None:
    invocations = tpns_invocations()
    used = {argv[0] for _, argv in invocations}
    assert {"worker", "serve", "health", "sandbox"} <= used
    runner = CliRunner()
    for where, argv in invocations:
        result = runner.invoke(main, [argv[0], "--help"])
        assert result.exit_code == 0, f"{where}: tpns-batcher {argv[0]} does not exist"
        # the options used must be the command's own (a worker's extra args go to Celery)
        if argv[0] != "worker":
            for option in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
                assert option in result.output, f"{where}: {argv[0]} has no option {option}"


# -- compose -----------------------------------------------------------------------------------------


def test_compose_runs_the_beat_in_exactly_one_service() -> None:
    services = compose()["services"]
    beats = [name for name, svc in services.items()
             if "command" in svc and runs_beat(as_argv(svc["command"]))]
    assert beats == ["worker-beat"]
    assert services["worker-beat"].get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in services["worker-beat"]
    workers = [name for name, svc in services.items()
               if as_argv(svc.get("command", []))[:2] == ["tpns-batcher", "worker"]]
    assert sorted(workers) == ["worker", "worker-beat"]


def test_compose_redis_is_persistent_and_never_evicts() -> None:
    redis = compose()["services"]["redis"]
    argv = as_argv(redis["command"])
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_compose_roles_and_configuration() -> None:
    data = compose()
    services = data["services"]
    assert services["sandbox"]["profiles"] == ["sandbox"]
    flower = as_argv(services["flower"]["command"])
    assert flower[:4] == ["celery", "-A", "worker.celery_app", "flower"]
    lease = float(read_env_file(EXAMPLE_ENV)["TPNS_LEASE_S"])
    for name in ("worker", "worker-beat", "serve", "flower"):
        svc = services[name]
        assert svc["env_file"] == "../config/tpns-batcher.env"
        assert svc["environment"]["REDIS_URL"].startswith("redis://redis:")
    for name in ("worker", "worker-beat"):
        svc = services[name]
        assert _seconds(svc["stop_grace_period"]) > lease + 30
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "tpns-batcher", "health", "--worker"] and "--local" in test
    assert services["serve"]["healthcheck"]["test"][1:3] == ["tpns-batcher", "health"]
    assert data["secrets"]["tpns_secret_key"]["file"] == "../config/tpns-secret-key"


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


# -- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_is_small_non_root_and_health_checked() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1))
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", text, re.M)
    assert health and yaml.safe_load(health.group(1))[:2] == ["tpns-batcher", "health"]
    assert "pip wheel --no-deps" in text and "COPY worker ./worker" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert ignore[ignore.index("*"):][:1] == ["*"] and "!worker/" in ignore


# -- Kubernetes ----------------------------------------------------------------------------------


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def test_k8s_workers_probe_with_health_and_outlast_the_lease() -> None:
    config = _by_kind("ConfigMap")["tpns-batcher-config"]["data"]
    lease = float(config["TPNS_LEASE_S"])
    deployments = _by_kind("Deployment")
    workers = {n: d for n, d in deployments.items() if "worker" in n}
    assert sorted(workers) == ["tpns-batcher-worker", "tpns-batcher-worker-beat"]
    beats = []
    for name, doc in workers.items():
        pod = doc["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > lease + 30
        (container,) = pod["containers"]
        argv = container["command"]
        if runs_beat(argv):
            beats.append(name)
        # liveness from the local heartbeat only (a Redis outage restarts no pod); readiness
        # asks Redis (an outage or a pause shows as not ready, without restarts)
        liveness = container["livenessProbe"]["exec"]["command"]
        assert liveness[:3] == ["tpns-batcher", "health", "--worker"] and "--local" in liveness
        assert container["readinessProbe"]["exec"]["command"][:2] == ["tpns-batcher", "health"]
        assert "--local" not in container["readinessProbe"]["exec"]["command"]
        # the heartbeat file must be writable: TPNS_DATA_DIR on a writable volume
        data_dir = {e["name"]: e.get("value") for e in container.get("env", [])}["TPNS_DATA_DIR"]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert any(Path(data_dir).is_relative_to(m) for m in mounts if m != "/etc/tpns-batcher/secret")
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
    assert beats == ["tpns-batcher-worker-beat"]
    beat = workers["tpns-batcher-worker-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"


def test_k8s_secret_is_mounted_as_the_secret_key_file() -> None:
    config = _by_kind("ConfigMap")["tpns-batcher-config"]["data"]
    key_file = Path(config["TPNS_SECRET_KEY_FILE"])
    assert "TPNS_SECRET_KEY" not in config
    (secret_name,) = _by_kind("Secret")
    secret = _by_kind("Secret")[secret_name]
    assert key_file.name in (secret.get("stringData") or secret.get("data") or {})
    for name, doc in _by_kind("Deployment").items():
        if "worker" not in name:
            continue
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        (container,) = containers(doc)
        assert {"configMapRef": {"name": "tpns-batcher-config"}} in container["envFrom"]
        mounts = [m for m in container["volumeMounts"]
                  if volumes[m["name"]].get("secret", {}).get("secretName") == secret_name]
        assert len(mounts) == 1 and mounts[0]["readOnly"] is True
        assert Path(mounts[0]["mountPath"]) == key_file.parent
        assert all("TPNS_SECRET_KEY" not in str(e) for e in container.get("env", []))


def test_k8s_serve_has_a_service_and_autoscaling_targets_beatless_workers() -> None:
    serve = _by_kind("Deployment")["tpns-batcher-serve"]
    (container,) = containers(serve)
    assert container["command"][:2] == ["tpns-batcher", "serve"]
    labels = serve["spec"]["template"]["metadata"]["labels"]
    (service,) = _by_kind("Service").values()
    assert service["spec"]["selector"].items() <= labels.items()
    (scaled,) = _by_kind("ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]["name"]
    (container,) = containers(_by_kind("Deployment")[target])
    assert "--no-beat" in container["command"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "tpns_queue_depth" in trigger["metadata"]["query"]
    kustomize = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kustomize["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


# -- systemd -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", unit_names())
def test_systemd_unit(name: str) -> None:
    parsed = unit(name)
    assert {"Unit", "Service", "Install"} <= set(parsed.sections())
    service = parsed["Service"]
    # none of these is ever meant to exit: whatever the status, it comes back
    assert service["Restart"] == "always"
    assert service["EnvironmentFile"] == "/etc/tpns-batcher/tpns-batcher.env"
    assert service["User"] not in ("root", "0") and service["User"] == "tpns-batcher"
    assert service["KillSignal"] == "SIGTERM"
    lease = float(read_env_file(EXAMPLE_ENV)["TPNS_LEASE_S"])
    assert float(service["TimeoutStopSec"]) > lease
    if "worker" in name:
        assert float(service["TimeoutStopSec"]) > lease + 30
        # systemd's watchdog, fed by the worker's own (a stuck or frozen worker is restarted)
        assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
        assert 0 < float(service["WatchdogSec"]) <= 60
        assert "health --worker --local" in service["ExecStartPost"]
    assert "tpns-batcher health" in service["ExecStartPost"]


def test_systemd_beat_runs_in_one_unit() -> None:
    beats = [name for name in unit_names()
             if runs_beat(shlex.split(unit(name)["Service"]["ExecStart"]))]
    assert beats == ["tpns-batcher-worker-beat.service"]


# -- config/example.env --------------------------------------------------------------------------


def test_example_env_documents_every_variable_and_loads() -> None:
    text = EXAMPLE_ENV.read_text(encoding="utf-8")
    for var in SPEC_VARIABLES:
        assert re.search(rf"^#?{var}=", text, re.M), f"{var} is not in config/example.env"
    settings = Settings.from_env({}, config_file=EXAMPLE_ENV)
    assert settings.lease_s == 60 and settings.prefix == "tpns:" and settings.status_detail_s == 3600
    assert settings.app.base_url == "http://sandbox:8810"
    # no secret values: every secret variable is commented out or empty
    for var in ("TPNS_SECRET_KEY", "TPNS_API_TOKEN"):
        assert not read_env_file(EXAMPLE_ENV).get(var)


# -- the README's configuration table and the defaults the docs quote -----------------------------

README = ROOT / "README.md"
#: the documents that quote defaults as "`TPNS_X` (N)": the READMEs and the deploy files' comments
QUOTING_DEFAULTS = (README, DEPLOY / "README.md", *sorted(K8S.glob("*.yaml")),
                    *sorted(SYSTEMD.glob("*.service")), COMPOSE, EXAMPLE_ENV)


def settings_defaults() -> dict[str, Any]:
    """Each setting's default, by the variable that sets it (``max_in_flight``: TPNS_MAX_IN_FLIGHT)."""
    return {f"TPNS_{f.name.upper()}": f.default for f in dataclasses.fields(Settings)
            if f.default is not dataclasses.MISSING}


def readme_configuration() -> str:
    """The README's "Configuration" section: the paragraph and the table."""
    text = README.read_text(encoding="utf-8")
    return text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]


def test_readme_configuration_names_every_variable_settings_reads() -> None:
    source = (ROOT / "worker" / "settings.py").read_text(encoding="utf-8")
    read = set(re.findall(r'"((?:TPNS|REDIS|CELERY)_[A-Z0-9_]*[A-Z0-9])"', source))
    assert {"TPNS_MAX_IN_FLIGHT", "TPNS_STATUS_DETAIL_S", "REDIS_URL"} <= read
    section = readme_configuration()
    missing = sorted(var for var in read if f"`{var}`" not in section)
    assert missing == [], f"README's Configuration section does not name {missing}"


def test_readme_configuration_defaults_are_the_settings_defaults() -> None:
    defaults = settings_defaults()
    checked = []
    for line in readme_configuration().splitlines():
        if not line.startswith("| `"):
            continue
        names_cell, _meaning, default_cell = (c.strip() for c in line.strip().strip("|").split("|"))
        names = re.findall(r"`((?:TPNS|REDIS|CELERY)_[A-Z0-9_]+)`", names_cell)
        values = [v.strip().strip("`") for v in default_cell.split(",")]
        if len(names) != len(values):
            continue  # "`TPNS_REGION` / `TPNS_BASE_URL`": one default for several names
        for name, value in zip(names, values, strict=True):
            if name in defaults and re.fullmatch(r"\d+", value):
                assert float(value) == float(defaults[name]), \
                    f"README: {name} defaults to {value}; settings.py: {defaults[name]}"
                checked.append(name)
    assert {"TPNS_MAX_IN_FLIGHT", "TPNS_STATUS_DETAIL_S", "TPNS_STATUS_TTL_S"} <= set(checked)
    assert len(checked) >= 15, checked


def test_defaults_quoted_in_the_docs_are_the_settings_defaults() -> None:
    defaults = settings_defaults()
    quoted = 0
    for path in QUOTING_DEFAULTS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"(TPNS_[A-Z0-9_]+)`? \((\d[\d,]*)(?: s| ms)?\)", text):
            name, value = m.group(1), m.group(2).replace(",", "")
            assert name in defaults, f"{path.name}: {m.group(0)!r} quotes a default of no setting"
            assert float(value) == float(defaults[name]), \
                f"{path.relative_to(ROOT)}: {m.group(0)!r}, but settings.py's default is {defaults[name]}"
            quoted += 1
    assert quoted >= 3
