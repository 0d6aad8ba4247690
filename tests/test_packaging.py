"""The container image, compose.yaml and the CI workflow, checked against the project itself.

No container engine runs on the development machines, so compose.yaml is checked structurally:
its services, images and commands (parsed by kizo's own parser), every Kizo service's
environment (each name one the configuration reads, each value one it accepts), ports, health
checks, mounted files, the gateway's upstream, Prometheus' targets and Toxiproxy's proxies.
``docker compose config`` and ``docker build`` run only where docker can run them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from chaos.mockbank.settings import settings_from_env
from chaos.proxy import model as proxy_model
from infra import prometheus
from infra.config import Config
from kizo.cli import TABLE, build_parser

ROOT = Path(__file__).resolve().parent.parent
KIZO_IMAGE = "kizo:"
# The images of the servers around Kizo: the official ones the issue names.
SERVER_IMAGES = {
    "postgres": "postgres:",
    "valkey": "valkey/valkey:",
    "toxiproxy": "ghcr.io/shopify/toxiproxy:",
    "prometheus": "prom/prometheus:",
    "grafana": "grafana/grafana:",
    "gateway": "nginx:",
}
ONE_SHOT = {"migrate"}
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (inside a container: where the others reach it)
# Which URL of a Kizo process each proxy of toxiproxy/*.json stands in front of.
PROXIED_URL = {"postgres": "DATABASE_URL", "redis": "REDIS_URL", "bank": "KIZO_BANK_URL"}
SECRET_WORDS = ("PASSWORD", "PEPPER", "KEYRING_KEY", "TOKEN", "SECRET")
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


def _yaml(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text())


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#"))  # fmt: skip
    return {name.strip(): value.strip() for name, value in pairs}


def _filled_env() -> dict[str, str]:
    """.env.example with a made-up value for every secret it leaves empty."""
    filled = _env_example()
    for name, value in filled.items():
        if not value:
            filled[name] = f"made-up-{name.lower()}-" + "x" * 16
    filled["KIZO_KEYRING_KEY"] = "A" * 43  # 32 bytes of base64url
    return filled


def _interpolate(value: Any, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``, from ``env``."""

    def one(match: re.Match[str]) -> str:
        name, whole = match.group(1), match.group(0)
        if name in env and env[name] != "":
            return env[name]
        if ":-" in whole:
            return whole.split(":-", 1)[1][:-1]
        raise AssertionError(f"{whole} has no value and no default")

    return _VAR.sub(one, str(value))


class _Recording(dict[str, str]):
    """An environment that notes every name read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def known_env_names() -> set[str]:
    """Every name the configuration reads: Config.from_env's and the bank's, as they run."""
    env = _Recording()
    config = Config.from_env(env)
    settings_from_env(config, env)
    return env.read


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A service of compose.yaml with an override file's service merged in (compose's rules
    for the keys used here: mappings merge, the rest replaces)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


def _services(*override_files: str) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _yaml("compose.yaml")["services"]
    for name in override_files:
        for service, override in _yaml(name)["services"].items():
            assert service in services, f"{name} names {service}, which compose.yaml has not"
            services = {**services, service: _merged(services[service], override)}
    return services


def _kizo(services: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((n, s) for n, s in services.items() if str(s.get("image", "")).startswith(KIZO_IMAGE))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = _filled_env()
    return {
        name: _interpolate(value, env) for name, value in service.get("environment", {}).items()
    }


def _config(service: dict[str, Any]) -> Config:
    return Config.from_env({**_image_env(), **_env(service)})


def _image_env() -> dict[str, str]:
    """The ENV the image sets for every process (Dockerfile's last stage)."""
    last_stage = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.+?)(?<!\\)$", last_stage, re.M | re.S):
        for pair in re.split(r"\s*\\\n\s*|\s+", block.strip()):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def _http_check(service: dict[str, Any]) -> tuple[int, str]:
    """The port and path a service's health check asks for."""
    test = service["healthcheck"]["test"]
    url = next(str(word) for word in test if str(word).startswith("http://"))
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", f"{url}: a health check asks its own container"
    return int(parts.port or 80), parts.path


def _metrics_port(name: str, service: dict[str, Any]) -> tuple[int, str]:
    """Where a Kizo service answers, and its readiness path, from its own configuration."""
    config, args = _config(service), _args(service)
    if args.command == "api":
        return config.api_port, "/ready"
    if args.command == "bank":
        return config.bank_port, "/health"
    if args.command == "janitor":
        return config.pipeline.janitor_metrics_port, "/metrics"
    if args.command == "worker":
        # A worker serves /metrics only once it consumes: the readiness there is.
        return int(args.metrics_port), "/metrics"
    raise AssertionError(f"{name}: no readiness known for kizo {args.command}")


def _args(service: dict[str, Any]) -> Any:
    command = [str(word) for word in service["command"]]
    assert command[0] in TABLE, f"kizo has no command {command[0]!r}"
    return build_parser(command[0]).parse_args(command)


# --- the configuration's names ---------------------------------------------------------------


def test_the_known_names_are_read_by_the_configuration_itself() -> None:
    names = known_env_names()
    # Those compose.yaml depends on, read where the processes read them.
    assert {"DATABASE_URL", "REDIS_URL", "KIZO_HOST", "KIZO_PEPPER", "KIZO_KEYRING_KEY",
            "KIZO_BANK_URL", "BANK_DATABASE_URL", "KIZO_HOME"} <= names  # fmt: skip
    assert "KIZO_NOT_A_SETTING" not in names


def test_every_kizo_service_sets_only_names_the_configuration_reads() -> None:
    known = known_env_names()
    for file in (("compose.yaml",), ("compose.yaml", "compose.chaos.yaml")):
        for name, service in _kizo(_services(*file[1:])):
            unknown = set(service.get("environment", {})) - known
            assert not unknown, f"{name} in {file}: {sorted(unknown)} are read by no Kizo process"
    assert not {n for n in _image_env() if n.startswith("KIZO_")} - known
    assert not {n for n in _env_example() if n.startswith("KIZO_")} - known


def test_every_kizo_service_has_a_configuration_kizo_accepts() -> None:
    from api._auth import require_secrets

    for name, service in _kizo(_services("compose.chaos.yaml")):
        config = _config(service)  # ConfigError on a bad value
        assert config.host == ALL_INTERFACES, f"{name} must listen where other containers reach it"
        assert not config.embedded_postgres, f"{name} would start an embedded PostgreSQL"
        if _args(service).command == "api":
            require_secrets(config.auth)
        if _args(service).command not in {"migrate", "bank"}:
            assert not config.embedded_redis, f"{name} would start an embedded Valkey"


# --- compose.yaml ----------------------------------------------------------------------------


def test_compose_runs_the_servers_on_their_official_images() -> None:
    services = _services()
    for name, prefix in SERVER_IMAGES.items():
        assert str(services[name]["image"]).startswith(prefix), name
    kizo = dict(_kizo(services))
    assert {s["build"] for s in kizo.values()} == {"."}, "every Kizo service builds one image"
    assert len({s["image"] for s in kizo.values()}) == 1
    commands = {_args(s).command for s in kizo.values()}
    assert commands == {"migrate", "bank", "api", "worker", "janitor"}
    assert set(services) == set(SERVER_IMAGES) | set(kizo)


def test_compose_runs_two_api_replicas_and_workers_that_share_every_shard() -> None:
    services = _services()
    api = [s for _, s in _kizo(services) if _args(s).command == "api"]
    assert len(api) == 1 and api[0]["deploy"]["replicas"] >= 2
    workers = [_args(s) for _, s in _kizo(services) if _args(s).command == "worker"]
    assert len(workers) >= 2
    assert {w.of for w in workers} == {len(workers)}
    assert sorted(w.index for w in workers) == list(range(len(workers)))


def test_every_service_is_restarted_and_checked_for_readiness() -> None:
    services = _services()
    for name, service in services.items():
        if name in ONE_SHOT:
            assert str(service["restart"]).startswith("on-failure"), name
            continue
        assert service["restart"] in {"unless-stopped", "always"}, name
        if name != "toxiproxy":  # its image has no shell or client: started is ready
            assert "healthcheck" in service, f"{name} has no health check"
    for name, service in _kizo(services):
        if name in ONE_SHOT:
            continue
        assert _http_check(service) == _metrics_port(name, service), name


def test_dependencies_wait_for_readiness_and_migrations() -> None:
    services = _services("compose.chaos.yaml")
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            assert needed in services, f"{name} depends on a service that does not exist"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits for {needed}'s health"
            if how["condition"] == "service_completed_successfully":
                assert needed in ONE_SHOT
    for _name, service in _kizo(services):
        if _args(service).command in {"api", "worker", "janitor"}:
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_kizo_processes_reach_the_servers_of_compose() -> None:
    services = _services()
    bank = next(s for _, s in _kizo(services) if _args(s).command == "bank")
    expected = {"DATABASE_URL": ("postgres", 5432), "REDIS_URL": ("valkey", 6379),
                "KIZO_BANK_URL": ("bank", _config(bank).bank_port)}  # fmt: skip
    for name, service in _kizo(services):
        for variable, (host, port) in expected.items():
            url = _env(service).get(variable)
            if url is not None:
                parts = urlsplit(url)
                assert (parts.hostname, parts.port) == (host, port), f"{name} {variable}"
                assert host in services


def test_published_ports_are_loopback_only() -> None:
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to the world"


def test_no_secret_is_written_in_the_compose_files() -> None:
    example = _env_example()
    for file in ("compose.yaml", "compose.chaos.yaml"):
        text = (ROOT / file).read_text()
        for name in _VAR.findall(text):
            assert name in example, f"{file} uses ${{{name}}}, which .env.example does not name"
        for service in _yaml(file)["services"].values():
            for variable, value in (service.get("environment") or {}).items():
                secret = any(word in variable for word in SECRET_WORDS)
                if secret or variable.endswith("DATABASE_URL"):
                    assert "${" in str(value), f"{file}: {variable} is written in the file"
    for name, value in example.items():
        if any(word in name for word in SECRET_WORDS):
            assert value == "", f".env.example gives {name} a value"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_mounted_files_exist_and_volumes_are_named() -> None:
    compose = _yaml("compose.yaml")
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def _mounted(service: dict[str, Any], container_path: str) -> Path:
    """The file of this checkout that a container sees at ``container_path``."""
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("./") and container_path.startswith(target):
            return ROOT / source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is mounted from no file of the checkout")


# --- the gateway -----------------------------------------------------------------------------


def test_the_gateway_balances_the_api_replicas_on_their_port() -> None:
    services = _services()
    gateway = services["gateway"]
    conf = _mounted(gateway, "/etc/nginx/conf.d/default.conf").read_text()
    upstreams = re.findall(r"^\s*server\s+([a-z0-9-]+):(\d+)", conf, re.M)
    api = services["api"]
    assert upstreams == [("api", str(_config(api).api_port))]
    listen = int(re.findall(r"^\s*listen\s+(\d+);", conf, re.M)[0])
    published = [str(p).rsplit(":", 1) for p in gateway["ports"]]
    assert [int(p[1]) for p in published] == [listen]
    assert urlsplit(gateway["healthcheck"]["test"][-1]).port == listen


def test_the_api_trusts_the_gateway_and_only_the_gateway() -> None:
    compose = _yaml("compose.yaml")
    services = compose["services"]
    gateway = ipaddress.ip_address(services["gateway"]["networks"]["default"]["ipv4_address"])
    subnet = ipaddress.ip_network(compose["networks"]["default"]["ipam"]["config"][0]["subnet"])
    assert gateway in subnet
    trusted = _config(services["api"]).limits.trusted_proxies
    assert [ipaddress.ip_network(t) for t in trusted] == [ipaddress.ip_network(gateway)]


# --- Toxiproxy and the chaos profile ---------------------------------------------------------


def _proxies(name: str) -> dict[str, proxy_model.ProxySpec]:
    data = (ROOT / "toxiproxy" / name).read_bytes()
    return {s.name: s for s in proxy_model.populate_specs(proxy_model.load(data))}


def test_toxiproxy_in_compose_has_the_proxies_of_toxiproxy_json_addressed_to_services() -> None:
    services = _services()
    toxiproxy = services["toxiproxy"]
    config_file = toxiproxy["command"][toxiproxy["command"].index("-config") + 1]
    local, composed = _proxies("toxiproxy.json"), _proxies(_mounted(toxiproxy, config_file).name)
    assert set(composed) == set(local) == set(PROXIED_URL)
    base_env = {n: _env(s) for n, s in _kizo(services)}
    for name, spec in composed.items():
        assert spec.listen.rsplit(":", 1)[1] == local[name].listen.rsplit(":", 1)[1]
        assert spec.listen.startswith(f"{ALL_INTERFACES}:"), "other containers must reach the proxy"
        # The upstream is where the processes reach that server without the chaos profile.
        upstreams = {urlsplit(env[PROXIED_URL[name]]).netloc.rsplit("@", 1)[-1]
                     for env in base_env.values() if PROXIED_URL[name] in env}  # fmt: skip
        assert upstreams == {spec.upstream}, name


def test_the_chaos_profile_routes_every_kizo_client_through_toxiproxy() -> None:
    services = _services()
    assert services["toxiproxy"]["profiles"] == ["chaos"]
    composed = _proxies("compose.json")
    routed = _services("compose.chaos.yaml")
    chaos_services = set(_yaml("compose.chaos.yaml")["services"])
    clients = {n for n, s in _kizo(services) if _args(s).command in {"api", "worker", "janitor"}}
    assert chaos_services == clients
    for name in clients:
        env = _env(routed[name])
        assert "toxiproxy" in routed[name]["depends_on"]
        for proxy, variable in PROXIED_URL.items():
            if variable in _env(services[name]):
                address = urlsplit(env[variable]).netloc.rsplit("@", 1)[-1]
                port = composed[proxy].listen.rsplit(":", 1)[1]
                assert address == f"toxiproxy:{port}", f"{name} {variable}"


# --- Prometheus and Grafana ------------------------------------------------------------------


def test_prometheus_in_compose_scrapes_every_kizo_process_as_kizo_up_does() -> None:
    services = _services()
    server = services["prometheus"]
    flag = next(a for a in server["command"] if a.startswith("--config.file="))
    path = _mounted(server, flag.split("=", 1)[1])
    config, local = yaml.safe_load(path.read_text()), yaml.safe_load(prometheus.render())
    assert config["global"] == local["global"] and config["rule_files"] == local["rule_files"]
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        labels = {r["target_label"] for r in job["relabel_configs"]}
        assert labels >= {"role", "process", "system"}, job["job_name"]
        for sd in job["dns_sd_configs"]:
            scraped.update(dict.fromkeys(sd["names"], sd["port"]))
    expected = {n: _metrics_port(n, s)[0] for n, s in _kizo(services) if n not in ONE_SHOT}
    assert scraped == expected


def test_prometheus_accepts_its_compose_configuration() -> None:
    promtool = prometheus.binary("promtool")
    if promtool is None:
        pytest.skip("no promtool (make test unpacks one)")
    result = subprocess.run([promtool, "check", "config", "prometheus-compose.yml"],
                            cwd=ROOT / "observability", capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_dashboards_and_compose_prometheus() -> None:
    services = _services()
    grafana = services["grafana"]
    providers = _mounted(grafana, "/etc/grafana/provisioning/dashboards/kizo.yml")
    path = yaml.safe_load(providers.read_text())["providers"][0]["options"]["path"]
    assert list(_mounted(grafana, path).glob("*.json")), "no dashboard where Grafana looks"
    datasources = _mounted(grafana, "/etc/grafana/provisioning/datasources/kizo.yml")
    url = urlsplit(yaml.safe_load(datasources.read_text())["datasources"][0]["url"])
    assert url.hostname in services and url.hostname == "prometheus"
    assert f"127.0.0.1:{url.port}:{url.port}" in services["prometheus"]["ports"]


# --- the image -------------------------------------------------------------------------------


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_the_image_is_multi_stage_locked_and_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    pinned = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pinned and f"ARG UV_VERSION={pinned.group(1)}" in text
    assert re.search(r"uv sync --locked --no-dev\b", text)
    last_stage = text.rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER (\S+)", last_stage, re.M)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    assert re.findall(r"^ENTRYPOINT (.+)$", last_stage, re.M) == ['["kizo"]']
    assert _image_env()["KIZO_HOME"].startswith("/var/lib/"), "KIZO_HOME is the user's, writable"


def test_the_image_copies_every_package_and_nothing_the_build_context_leaves_out() -> None:
    sources = set(_build_stage_copies())
    for source in sources:
        assert (ROOT / source).exists() and _dockerignore_allows(source), source
    wheel = re.search(r"packages = \[(.+?)\]", (ROOT / "pyproject.toml").read_text())
    assert wheel is not None
    packages = set(json.loads(f"[{wheel.group(1)}]"))
    # migrations/ by name; toxiproxy/ and observability/ are read at run time (kizo proxy,
    # kizo chaos's Prometheus).
    assert packages | {"migrations", "toxiproxy", "observability", "uv.lock"} <= sources
    assert not _dockerignore_allows(".env") and not _dockerignore_allows(".kizo")


def _build_stage_copies() -> list[str]:
    """What the build stage copies from the context, in order."""
    text = (ROOT / "Dockerfile").read_text()
    copies = [line.split() for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M)]
    return [word for words in copies for word in words[:-1] if not word.startswith("--")]


# Run inside the image's environment: every command of kizo loads, with its options.
_LOAD_EVERY_COMMAND = """
import importlib.util, sys
from kizo.cli import TABLE, build_parser
for name in TABLE:
    build_parser(name)
print(sorted(TABLE))
sys.exit(importlib.util.find_spec("pytest") is not None)
"""


def test_what_the_image_copies_serves_every_command_without_the_dev_group(
    tmp_path: Path,
) -> None:
    """The build stage's steps without an engine: the files it copies, `uv sync --locked
    --no-dev` into a fresh environment, then every command loaded from there."""
    uv = ROOT / ".tools" / "bin" / "uv"
    if not uv.is_file():
        pytest.skip("no uv under .tools (make install puts it there)")
    app = tmp_path / "app"
    app.mkdir()
    for source in _build_stage_copies():
        copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy2
        copy(ROOT / source, app / source)
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(app / ".venv"),
           "UV_PYTHON_DOWNLOADS": "never"}  # fmt: skip
    subprocess.run([str(uv), "sync", "--locked", "--no-dev", "--quiet", "--python", sys.executable],
                   cwd=app, env=env, check=True, timeout=300)  # fmt: skip
    result = subprocess.run([str(app / ".venv" / "bin" / "python"), "-c", _LOAD_EVERY_COMMAND],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == str(sorted(TABLE))


@pytest.mark.parametrize(
    ("schema", "files"),
    [
        ("vendor.compose-spec", ["compose.yaml", "compose.chaos.yaml"]),
        ("vendor.github-workflows", [".github/workflows/ci.yml"]),
    ],
)
def test_the_files_follow_the_published_schemas(schema: str, files: list[str]) -> None:
    """The Compose Specification's and GitHub's own schemas (as check-jsonschema ships them)."""
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed (NEEDS.md)")
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *files]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _docker_can(*args: str) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", *args], capture_output=True, timeout=20,
                              check=False).returncode == 0  # fmt: skip
    except subprocess.TimeoutExpired:
        return False


def test_docker_compose_accepts_both_files() -> None:
    if not _docker_can("compose", "version"):
        pytest.skip("no `docker compose` on this machine: checked structurally above")
    env = {**os.environ, **_filled_env()}
    for files in (["-f", "compose.yaml"], ["-f", "compose.yaml", "-f", "compose.chaos.yaml",
                                           "--profile", "chaos"]):  # fmt: skip
        result = subprocess.run(["docker", "compose", *files, "config", "--quiet"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60,
                                check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_the_image_builds_and_runs_kizo() -> None:
    if not _docker_can("info"):
        pytest.skip("no container engine running on this machine")
    tag = "kizo:packaging-test"
    subprocess.run(["docker", "build", "-t", tag, "."], cwd=ROOT, check=True, timeout=1800)
    result = subprocess.run(["docker", "run", "--rm", tag, "--help"], capture_output=True,
                            text=True, timeout=120, check=True)  # fmt: skip
    assert all(name in result.stdout for name in ("api", "worker", "janitor", "migrate"))
    uid = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert uid.stdout.strip() != "0"


# --- CI --------------------------------------------------------------------------------------


def _make_targets(text: str) -> list[str]:
    return re.findall(r"\bmake\s+(?:--?\S+\s+)*([a-z][a-z0-9-]*)", text)


def _workflow() -> dict[str, Any]:
    loaded: dict[Any, Any] = _yaml(".github/workflows/ci.yml")
    # YAML 1.1 reads the key `on` as true.
    triggers = loaded.pop(True, loaded.get("on"))
    return {**loaded, "on": triggers}


def _job_runs(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) for step in job["steps"])


def test_the_workflow_runs_the_targets_of_ci_run_and_the_chaos_jobs() -> None:
    workflow = _workflow()
    assert {"push", "pull_request", "schedule"} <= set(workflow["on"])
    jobs = workflow["jobs"]
    ci_run = _make_targets((ROOT / ".ci" / "run").read_text())
    assert ci_run and _make_targets(_job_runs(jobs["test"])) == ci_run
    assert "make chaos-short" in _job_runs(jobs["chaos-short"])
    full = jobs["chaos-full"]
    assert "schedule" in full["if"] and "make chaos" in _job_runs(full)
    makefile = (ROOT / "Makefile").read_text()
    for job in jobs.values():
        assert job["runs-on"] and job["timeout-minutes"] > 0
        for target in _make_targets(_job_runs(job)):
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make {target}"


def test_the_full_chaos_job_keeps_the_reports_where_chaos_runs_write_them() -> None:
    from chaos.runner import RUNS_DIR

    steps = _workflow()["jobs"]["chaos-full"]["steps"]
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert Path(upload["with"]["path"]) == RUNS_DIR


def test_the_workflow_installs_the_debian_packages_make_installs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"apt-get install[^;}\n]*?((?:\s+[a-z][a-z0-9.+-]+)+)\s*;", makefile)
    wanted = {p for group in installs for p in group.split()}
    assert wanted, "the Makefile installs no Debian package: update this test"
    job = _workflow()["jobs"]["test"]
    test_job = _job_runs(job)
    assert "apt-get update" in test_job
    if "bookworm" in str(job.get("container", "")):  # root on Debian: make installs them itself
        assert "make test" in test_job
        return
    installed = {p for line in re.findall(r"apt-get install (.+)", test_job)
                 for p in line.split() if not p.startswith("-")}  # fmt: skip
    assert wanted <= installed
