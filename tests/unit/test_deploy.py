"""deploy/: the Kubernetes manifests render, validate and hold together; compose and the Dockerfile too. Offline."""
from __future__ import annotations

import configparser
import contextlib
import functools
import io
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

import click
import jsonschema
import kubernetes_validate
import pytest
import tornado.options
import yaml
from celery.bin.celery import celery as celery_cli

from flowpool.cli import main as flowpool_cli
from flowpool.queues import check_queue_name
from flowpool.settings import Settings
from tests.kustomize import Resource, build, split_image

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# What `kubectl apply -k` takes: the base, each overlay and the HPA-only alternative.
TARGETS = ["base", "overlays/dev", "overlays/prod", "overlays/process-backend",
           "alternatives/hpa-prometheus-adapter"]
# The Kubernetes version the manifests are validated against: the newest kubernetes-validate knows.
KUBERNETES_VERSION = kubernetes_validate.latest_version()
KEDA_SCHEMAS = {"ScaledObject": "scaledobject.yaml", "TriggerAuthentication": "triggerauthentication.yaml"}
PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"]


@functools.lru_cache(maxsize=None)
def _render(target: str) -> tuple[Resource, ...]:
    """The rendered resources of ``deploy/k8s/<target>``."""
    return tuple(build(K8S / target))


def rendered(target: str) -> list[Resource]:
    """A fresh copy of the rendered resources (tests may not change each other's)."""
    return yaml.safe_load(yaml.safe_dump(list(_render(target))))


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} {name} expected, found {len(found)}"
    return found[0]


def pod_spec(workload: Resource) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def config(resources: list[Resource]) -> dict[str, str]:
    """The flowpool ConfigMap's data."""
    return named(resources, "ConfigMap", "flowpool-config")["data"]


def container_env(resources: list[Resource], container: dict[str, Any]) -> dict[str, str | None]:
    """A container's environment as Kubernetes builds it: its ConfigMaps (envFrom), then its own ``env``.

    A value taken from a Secret (``valueFrom``) is None: the manifests do not hold it.
    """
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, source
        env.update(named(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value")
    return env


def known(env: dict[str, str | None]) -> dict[str, str]:
    """The variables of ``env`` whose value the manifests hold."""
    return {name: value for name, value in env.items() if value is not None}


def settings_of(data: dict[str, str]) -> Settings:
    """The Settings a pod with these FLOWPOOL_* variables builds (pydantic checks every value)."""
    return Settings(**{key.removeprefix("FLOWPOOL_").lower(): value for key, value in data.items()
                       if key.startswith("FLOWPOOL_")})


def workers(resources: list[Resource]) -> list[Resource]:
    return [d for d in of_kind(resources, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def worker_queues(deployment: Resource) -> list[str]:
    """The queues a worker Deployment's `flowpool worker --queues` consumes."""
    args = pod_spec(deployment)["containers"][0]["args"]
    assert args[:2] == ["flowpool", "worker"], args
    return args[args.index("--queues") + 1].split(",")


def keda_trigger(scaled_object: Resource) -> dict[str, Any]:
    (trigger,) = [t for t in scaled_object["spec"]["triggers"] if t["type"] == "metrics-api"]
    return trigger


def strict(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation reads it: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


@functools.lru_cache(maxsize=None)
def keda_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = strict(yaml.safe_load((DEPLOY / "schemas" / "keda" / KEDA_SCHEMAS[kind]).read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(resource: Resource) -> None:
    """Validate one object: Kubernetes' own kinds with kubernetes-validate (strict), KEDA's with its CRD schema."""
    if resource["apiVersion"].startswith("keda.sh/"):
        assert resource["apiVersion"] == "keda.sh/v1alpha1"
        keda_validator(resource["kind"]).validate(resource)
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


# --- Rendering: the Python renderer agrees with kubectl's kustomize. -------------------------------------------

def _key(resource: Resource) -> tuple[str, str, str | None, str]:
    meta = resource["metadata"]
    return resource["apiVersion"], resource["kind"], meta.get("namespace"), meta["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_python_render_matches_kubectl_kustomize(target: str) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: the Python render is checked by the other tests only")
    done = subprocess.run(["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = {_key(r): r for r in yaml.safe_load_all(done.stdout) if r}
    ours = {_key(r): r for r in rendered(target)}
    assert sorted(ours, key=str) == sorted(theirs, key=str)
    for key, resource in ours.items():
        assert resource == theirs[key], key


# --- Schemas. --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_validates_against_its_schema(target: str) -> None:
    for resource in rendered(target):
        validate(resource)


@pytest.mark.parametrize("change", ["an unknown field", "a wrong type"])
def test_the_validation_refuses_unknown_fields_and_wrong_types(change: str) -> None:
    resources = rendered("base")
    deployment = named(resources, "Deployment", "flowpool-worker-default")
    scaled = named(resources, "ScaledObject", "flowpool-worker-default")
    if change == "an unknown field":
        pod_spec(deployment)["terminationGracePeriod"] = 660
        scaled["spec"]["minReplicas"] = 0
    else:
        pod_spec(deployment)["terminationGracePeriodSeconds"] = "660"
        scaled["spec"]["minReplicaCount"] = "0"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


# --- Lint. -----------------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """A linter installed with the test extras, beside this interpreter."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def test_every_yaml_file_of_deploy_passes_yamllint() -> None:
    files = sorted(str(p) for p in DEPLOY.rglob("*.yaml")) + [str(DEPLOY / ".yamllint")]
    done = subprocess.run([_tool("yamllint"), "-f", "parsable", "-c", str(DEPLOY / ".yamllint"), *files],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([_tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_hadolint_ignore_is_justified_by_a_comment() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert number > 0 and lines[number - 1].startswith("#") and "hadolint" not in lines[number - 1], line


# --- Invariants of the rendered manifests. ----------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_a_stopping_worker_drains_every_run_before_it_is_killed(target: str) -> None:
    resources = rendered(target)
    data = config(resources)
    settings = settings_of(data)
    assert "FLOWPOOL_WORKER_DRAIN_SECONDS" in data, "set the drain explicitly, beside the grace period"
    longest_hard_limit = settings.max_timeout_seconds + settings.hard_timeout_grace_seconds
    assert settings.worker_drain >= longest_hard_limit
    for deployment in workers(resources):
        spec = pod_spec(deployment)
        assert spec["terminationGracePeriodSeconds"] >= math.ceil(settings.worker_drain) + 30, \
            "the grace period must cover the drain plus a margin to record the runs' ends"
        (container,) = spec["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == "kill -TERM 1"


@pytest.mark.parametrize("target", TARGETS)
def test_keda_scales_each_autoscaled_queue_and_nothing_else(target: str) -> None:
    resources = rendered(target)
    settings = settings_of(config(resources))
    deployments = {d["metadata"]["name"]: d for d in workers(resources)}
    scaled_queues = set()
    for scaled in of_kind(resources, "ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in deployments, ref
        (queue,) = worker_queues(deployments[ref["name"]])
        assert keda_trigger(scaled)["metadata"]["valueLocation"] == f"queues.{queue}.desired_workers"
        assert keda_trigger(scaled)["metadata"]["targetValue"] == "1"
        scaled_queues.add(queue)
        if scaled["spec"].get("minReplicaCount", 1) == 0:
            # A queue started from zero must be autoscaled: else its runs are a 503 while no worker serves it.
            assert queue in settings.autoscaled_queue_names, queue
    assert settings.autoscaled_queue_names <= scaled_queues
    for hpa in of_kind(resources, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments or hpa["metadata"]["name"] == "flowpool-api"


@pytest.mark.parametrize("target", TARGETS)
def test_keda_reads_the_pool_from_the_api_service_with_the_admin_token(target: str) -> None:
    resources = rendered(target)
    api = named(resources, "Service", "flowpool-api")
    (port,) = [p["port"] for p in api["spec"]["ports"]]
    namespace = api["metadata"].get("namespace")
    for scaled in of_kind(resources, "ScaledObject"):
        trigger = keda_trigger(scaled)
        url = urlsplit(trigger["metadata"]["url"])
        # KEDA's operator resolves the name from its own namespace: a placed Service needs its full name.
        host = f"flowpool-api.{namespace}.svc" if namespace else "flowpool-api"
        assert (url.scheme, url.hostname, url.port, url.path) == ("http", host, port, "/api/v1/pool")
        assert trigger["metadata"]["authMode"] == "bearer"
        auth = named(resources, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        (ref,) = auth["spec"]["secretTargetRef"]
        assert (ref["parameter"], ref["name"], ref["key"]) == ("token", "flowpool-secrets", "FLOWPOOL_ADMIN_TOKEN")


@pytest.mark.parametrize("target", TARGETS)
def test_the_api_is_ready_while_the_workers_are_scaled_to_zero(target: str) -> None:
    """Readiness is /readyz, which wants a live worker unless FLOWPOOL_AUTOSCALED_QUEUES is set (api/health.py).

    With KEDA at zero workers, no API pod would be ready and KEDA could not read the pool to start the first:
    so every queue a ScaledObject can scale to zero is named in the autoscaled queues the API pods read.
    """
    resources = rendered(target)
    (container,) = pod_spec(named(resources, "Deployment", "flowpool-api"))["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    autoscaled = settings_of(known(container_env(resources, container))).autoscaled_queue_names
    assert autoscaled == settings_of(config(resources)).autoscaled_queue_names, "the API reads the ConfigMap's"
    deployments = {d["metadata"]["name"]: d for d in workers(resources)}
    for scaled in of_kind(resources, "ScaledObject"):
        if scaled["spec"].get("minReplicaCount", 1) == 0:
            for queue in worker_queues(deployments[scaled["spec"]["scaleTargetRef"]["name"]]):
                assert queue in autoscaled, f"{queue} scales to zero: the API would not be ready with no worker"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector selects a pod with ``labels``."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _pods(resources: list[Resource]) -> dict[str, dict[str, str]]:
    """Each workload's pod labels, by its component."""
    return {r["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
            r["spec"]["template"]["metadata"]["labels"]
            for r in resources if r["kind"] in ("Deployment", "StatefulSet")}


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_api_takes_ingress_from_outside(target: str) -> None:
    resources = rendered(target)
    policies = of_kind(resources, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get(
        "ingress") for p in policies), "a default deny of ingress"
    pods = _pods(resources)
    allowed: dict[str, set[str]] = {component: set() for component in pods}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            for component, labels in pods.items():
                if not _selects(policy["spec"]["podSelector"], labels):
                    continue
                if not sources:
                    allowed[component].add("anywhere")
                for source in sources or []:
                    assert set(source) == {"podSelector"}, f"{policy['metadata']['name']}: pods of its namespace only"
                    allowed[component] |= {c for c, peer in pods.items() if _selects(source["podSelector"], peer)}
    assert allowed == {"api": {"anywhere"}, "redis": {"api", "worker", "flower"}, "cache": {"api", "worker"},
                       "worker": set(), "flower": set()}


@pytest.mark.parametrize("target", TARGETS)
def test_workers_reach_only_redis_dns_and_public_https(target: str) -> None:
    resources = rendered(target)
    (policy,) = [p for p in of_kind(resources, "NetworkPolicy")
                 if "Egress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], _pods(resources)["worker"])]
    for rule in policy["spec"]["egress"]:
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        assert rule.get("to"), "every egress rule names its peers"
        blocks = [peer["ipBlock"] for peer in rule["to"] if "ipBlock" in peer]
        if blocks:
            assert ports == {("TCP", 443)}
            v4 = [b for b in blocks if ":" not in b["cidr"]]
            assert all(set(PRIVATE_RANGES) <= set(b.get("except", [])) for b in v4), "no private range, no metadata"
        elif ports == {("TCP", 6379)}:
            assert all(set(peer) == {"podSelector"} for peer in rule["to"])
        else:
            assert ports == {("UDP", 53), ("TCP", 53)}


def _args(resources: list[Resource], name: str) -> str:
    (container,) = pod_spec(named(resources, "StatefulSet", name))["containers"]
    return " ".join(container["args"])


@pytest.mark.parametrize("target", TARGETS)
def test_the_registry_never_evicts_and_persists_and_the_cache_evicts(target: str) -> None:
    resources = rendered(target)
    registry = _args(resources, "flowpool-redis")
    assert "--appendonly yes" in registry and "--maxmemory-policy noeviction" in registry
    assert named(resources, "StatefulSet", "flowpool-redis")["spec"]["volumeClaimTemplates"]
    cache = _args(resources, "flowpool-cache")
    assert "--maxmemory-policy allkeys-lru" in cache and "--maxmemory " in cache and "--appendonly no" in cache
    data = config(resources)
    assert urlsplit(data["FLOWPOOL_REDIS_URL"]).hostname == "flowpool-redis"
    assert urlsplit(data["FLOWPOOL_CACHE_REDIS_URL"]).hostname == "flowpool-cache"
    for service in ("flowpool-redis", "flowpool-cache"):
        assert named(resources, "Service", service)["spec"]["clusterIP"] == "None"


def _containers(resources: list[Resource]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for workload in resources:
        if workload["kind"] in ("Deployment", "StatefulSet"):
            for container in pod_spec(workload)["containers"]:
                yield workload["metadata"]["name"], pod_spec(workload), container


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_runs_unprivileged(target: str) -> None:
    for name, pod, container in _containers(rendered(target)):
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert context.get("capabilities", {}).get("drop") == ["ALL"] and not context["capabilities"].get("add"), name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert not context.get("privileged"), name


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned_and_flowpool_runs_one_image(target: str) -> None:
    flowpool = set()
    for name, _, container in _containers(rendered(target)):
        _, tag, digest = split_image(container["image"])
        assert digest or (tag and tag != "latest"), f"{name}: {container['image']}"
        if container["args"][0] in ("flowpool", "celery"):
            flowpool.add(container["image"])
    assert len(flowpool) == 1, flowpool


@pytest.mark.parametrize("target", TARGETS)
def test_every_flowpool_variable_is_a_setting(target: str) -> None:
    resources = rendered(target)
    names = set(config(resources))
    for secret in of_kind(resources, "Secret"):
        names |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for _, _, container in _containers(resources):
        names |= {env["name"] for env in container.get("env", [])}
    unknown = {n for n in names if n.startswith("FLOWPOOL_")
               and n.removeprefix("FLOWPOOL_").lower() not in Settings.model_fields}
    assert not unknown
    settings_of(config(resources))


@pytest.mark.parametrize("target", TARGETS)
def test_task_events_are_on_in_the_workers_alone(target: str) -> None:
    """In the API, FLOWPOOL_WORKER_EVENTS turns on task-sent events, which take it off its fast publish path."""
    resources = rendered(target)
    for deployment in of_kind(resources, "Deployment"):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in pod_spec(deployment)["containers"]:
            env = container_env(resources, container)
            if component == "worker":
                assert settings_of(known(env)).worker_events, f"{deployment['metadata']['name']}: Flower sees no task"
            elif component == "api":
                assert "FLOWPOOL_WORKER_EVENTS" not in env, deployment["metadata"]["name"]


_K8S_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
_REDIS_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
_DOCKER_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _bytes(text: str, units: dict[str, int]) -> int:
    """A memory size with one of ``units``' suffixes, in bytes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text)).groups()  # type: ignore[union-attr]
    assert unit in units, text
    return int(number) * units[unit]


def _maxmemory(args: list[str]) -> int:
    assert "--maxmemory" in args, "without maxmemory Redis grows until the kernel kills it"
    return _bytes(args[args.index("--maxmemory") + 1].lower(), _REDIS_UNITS)


# The registry's maxmemory leaves this much of its limit to the AOF rewrite's fork, buffers and fragmentation.
FORK_HEADROOM = 0.35


@pytest.mark.parametrize("target", TARGETS)
def test_each_redis_answers_out_of_memory_before_the_kernel_kills_it(target: str) -> None:
    resources = rendered(target)
    for name in ("flowpool-redis", "flowpool-cache"):
        (container,) = pod_spec(named(resources, "StatefulSet", name))["containers"]
        limit = _bytes(container["resources"]["limits"]["memory"], _K8S_UNITS)
        assert _maxmemory(container["args"]) < limit, name
    (registry,) = pod_spec(named(resources, "StatefulSet", "flowpool-redis"))["containers"]
    limit = _bytes(registry["resources"]["limits"]["memory"], _K8S_UNITS)
    assert _maxmemory(registry["args"]) <= (1 - FORK_HEADROOM) * limit, "room for the AOF rewrite's fork"
    # Liveness waits for the startup probe: a long AOF load must not be killed and begun again.
    startup = registry["startupProbe"]
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 600
    assert registry["livenessProbe"]


def _remaining(ctx: click.Context) -> list[str]:
    """What a group's context left for its subcommand: the subcommand's name, then its arguments."""
    protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
    return [*protected, *ctx.args]


def _flower_options() -> tornado.options.OptionParser:
    """A parser of Flower's own options (flower/options.py defines them on tornado's global parser)."""
    import flower.options  # noqa: F401  (defines them)

    parser = tornado.options.OptionParser()
    for option in tornado.options.options._options.values():
        if option.group_name and "flower" in option.file_name:
            parser.define(option.name, default=option.default, type=option.type, multiple=option.multiple)
    return parser


def check_command(argv: list[str], env: Iterable[str] = ()) -> None:
    """Parse a container's command line as the program it names would, raising on what that program refuses.

    ``flowpool ...`` through flowpool's click group and the subcommand's own parser; ``celery ... flower ...``
    through celery's group (its app must be flowpool's) and then Flower's tornado options, with the
    FLOWER_* variables of ``env``, which Flower reads as options too.
    """
    program, *args = argv
    if program == "flowpool":
        group: click.Group = flowpool_cli
    elif program == "celery":
        group = celery_cli
    else:
        raise AssertionError(f"not a flowpool command: {argv}")
    ctx = group.make_context(program, list(args))
    name, command, rest = group.resolve_command(ctx, _remaining(ctx))
    assert command is not None, argv
    if program == "flowpool":
        parsed = command.make_context(name, list(rest), parent=ctx)
        assert not parsed.args, f"{argv}: arguments {parsed.args} taken by nothing"
        if name == "worker":
            for queue in parsed.params["queues"].split(","):
                check_queue_name(queue)
        return
    assert (ctx.params["app"], name) == ("flowpool.tasks.celery_app", "flower"), argv
    parser = _flower_options()
    with contextlib.redirect_stderr(io.StringIO()):  # tornado prints its help before it raises
        assert parser.parse_command_line(["flower", *rest], final=False) == [], f"{argv}: arguments left over"
    for variable in env:
        if variable.startswith("FLOWER_"):
            assert variable.removeprefix("FLOWER_").lower() in parser, f"Flower has no option for {variable}"


@pytest.mark.parametrize("target", TARGETS)
def test_every_flowpool_container_runs_a_command_line_its_program_accepts(target: str) -> None:
    resources = rendered(target)
    programs = set()
    for name, _, container in _containers(resources):
        argv = [*container.get("command", []), *container["args"]]
        if argv[0] in ("flowpool", "celery"):
            check_command(argv, container_env(resources, container))
            programs.add(" ".join(argv[:2]))
    assert programs == {"flowpool api", "flowpool worker", "celery -A"}, programs


@pytest.mark.parametrize("argv", [
    ["flowpool", "worker", "--queue", "default"],
    ["flowpool", "worker", "--queues", "Default"],
    ["flowpool", "api", "--bind", "0.0.0.0:8080"],
    ["flowpool", "api", "--port", "http"],
    ["flowpool", "serve"],
    ["celery", "-A", "flowpool.tasks.celery_app", "flower", "--listen=0.0.0.0"],
    ["celery", "-A", "flowpool.tasks.celery_app", "flower", "--port", "5555"],
    ["celery", "-A", "flowpool.tasks.celery_app", "flower", "--port=http"],
    ["celery", "-A", "flowpool.tasks.app", "flower"],
])
def test_the_command_check_refuses_what_would_crash_loop(argv: list[str]) -> None:
    with pytest.raises((click.ClickException, tornado.options.Error, ValueError, AssertionError)):
        check_command(argv)


def test_the_process_backend_overlay_drops_what_bwrap_needed() -> None:
    resources = rendered("overlays/process-backend")
    assert config(resources)["FLOWPOOL_SANDBOX_BACKEND"] == "process"
    for deployment in workers(resources):
        pod = pod_spec(deployment)
        context = pod["containers"][0]["securityContext"]
        assert "hostUsers" not in pod and "procMount" not in context
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert context["appArmorProfile"] == {"type": "RuntimeDefault"}
    assert config(rendered("base"))["FLOWPOOL_SANDBOX_BACKEND"] == "bwrap"


def test_prod_ships_no_placeholder_secret() -> None:
    for target in ("overlays/prod", "overlays/process-backend", "alternatives/hpa-prometheus-adapter"):
        assert not of_kind(rendered(target), "Secret"), target


# --- compose.yaml ------------------------------------------------------------------------------------------------

def _duration(text: str) -> float:
    """Seconds of a compose duration (``660s``, ``11m``, ``1m30s``)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_workers_drain_and_every_service_is_watched_and_restarted() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), name
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name
    worker = services["worker"]
    assert worker["command"][:2] == ["flowpool", "worker"] and worker["deploy"]["replicas"] >= 2
    drain = float(worker["environment"]["FLOWPOOL_WORKER_DRAIN_SECONDS"])
    settings = settings_of({k: v for k, v in worker["environment"].items() if not v.startswith("${")})
    assert drain == settings.worker_drain >= settings.max_timeout_seconds + settings.hard_timeout_grace_seconds
    assert _duration(worker["stop_grace_period"]) >= drain + 30
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--appendfsync everysec" in redis and "noeviction" in redis
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    for name, service in services.items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("FLOWPOOL_")
                   and k.removeprefix("FLOWPOOL_").lower() not in Settings.model_fields}
        assert not unknown, name


def test_compose_sends_task_events_from_the_workers_alone_and_caps_redis_memory() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert "FLOWPOOL_WORKER_EVENTS" not in services["api"]["environment"]
    worker = {k: v for k, v in services["worker"]["environment"].items() if not v.startswith("${")}
    assert settings_of(worker).worker_events
    redis = services["redis"]
    limit = _bytes(str(redis["mem_limit"]).lower(), _DOCKER_UNITS)
    assert _maxmemory(redis["command"]) <= (1 - FORK_HEADROOM) * limit
    assert _duration(redis["healthcheck"]["start_period"]) >= 600, "a long AOF load must not make Redis unhealthy"


def test_every_compose_service_of_flowpool_runs_a_command_line_its_program_accepts() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    checked = set()
    for name, service in services.items():
        command = service.get("command")
        if command and command[0] in ("flowpool", "celery"):
            check_command(command, service.get("environment", {}))
            checked.add(name)
    assert checked == {"api", "worker", "flower"}, checked


# --- Dockerfile ----------------------------------------------------------------------------------------------------

def test_the_image_copies_every_package_and_runs_as_a_numeric_non_root_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    folders = {line.partition("=")[2].strip().split("/")[0]
               for line in parser["options"]["package_dir"].strip().splitlines()}
    copied = set(re.findall(r"^COPY (?!--from)(\S+) ", text, re.M))
    assert folders <= copied, f"the wheel needs {sorted(folders - copied)}"
    assert all((ROOT / path).exists() for path in copied)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", text, re.M)
    assert "--no-install-recommends bubblewrap" in text and "[server" in text
    assert re.findall(r"^FROM ", text, re.M).__len__() >= 2
