"""The deployment files agree with the service: settings, routes, port, metrics, and rules
(non-root, no defaulted secrets, health-gated start-up, consistent hashing per replica)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from starlette.routing import Match

from aat_serve.service.app import create_app
from aat_serve.service.metrics import Metrics
from aat_serve.service.settings import Settings, load_settings
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    NGINX_CONF,
    ROOT,
    MissingVariable,
    all_strings,
    defaulted_secrets,
    dockerfile_stages,
    env_pairs,
    interpolate,
    interpolate_tree,
    load_yaml,
    load_yaml_all,
    references,
    upstream_servers,
)

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

FIELDS = {f"AAT_{name.upper()}" for name in Settings.model_fields}
ADMIN = "compose-admin-token-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No AAT_* from the machine running the tests leaks into settings checks."""
    import os

    for k in list(os.environ):
        if k.startswith("AAT_"):
            monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def routes():
    """The real application's routes (matched as Starlette dispatches, included routers too)."""
    return create_app(Settings.model_construct()).routes  # defaults, whatever the environment


def has_route(routes, method: str, path: str) -> bool:
    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "path_params": {}, "headers": [], "query_string": b""}
    return any(r.matches(scope)[0] == Match.FULL for r in routes)


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    """The settings the service would build from exactly this environment."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load_settings()


def test_route_lookup_tells_real_routes_from_others(routes):
    assert has_route(routes, "GET", "/healthz")
    assert has_route(routes, "POST", "/classify/esc50")
    assert not has_route(routes, "GET", "/health")
    assert not has_route(routes, "POST", "/healthz")


# ---- Dockerfile ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dockerfile():
    return dockerfile_stages((ROOT / "Dockerfile").read_text())


def test_dockerfile_is_multi_stage_on_one_cuda_runtime_base(dockerfile):
    args, stages = dockerfile
    assert re.fullmatch(r"nvidia/cuda:[\w.]+-runtime-ubuntu[\d.]+", args["BASE_IMAGE"])
    assert "cu" in args["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    names = [s.name for s in stages]
    assert names == ["python", "build", "runtime"]
    assert stages[0].base == "${BASE_IMAGE}"
    # build and runtime share the base stage, so /opt/venv's interpreter path exists in both
    assert stages[1].base == stages[2].base == "python"


def test_dockerfile_final_stage_has_no_build_tools(dockerfile):
    _, stages = dockerfile
    build, final = stages[1], stages[2]
    tools = re.compile(r"build-essential|\bgcc\b|python3-dev|python3-pip|python3-venv|"
                       r"pip install|\bgit\b")
    assert tools.search(" ".join(build.all("RUN")))  # the check finds them where they are
    assert not tools.search(" ".join(final.all("RUN")))
    assert not tools.search(" ".join(stages[0].all("RUN")))
    # the copied environment itself carries no pip
    assert "pip uninstall -y pip" in " ".join(build.all("RUN"))
    assert final.all("COPY") == ["--from=build /opt/venv /opt/venv"]


def test_dockerfile_runs_as_non_root(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0  # numeric: Kubernetes' runAsNonRoot can verify it
    assert gid.isdigit() and int(gid) != 0
    assert f"ARG UID={uid}" in [f"ARG {a}" for a in final.all("ARG")]
    deployment = _k8s_docs()["Deployment"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_dockerfile_entrypoint_is_aat_serve(dockerfile):
    _, stages = dockerfile
    (entry,) = stages[-1].all("ENTRYPOINT")
    assert json.loads(entry) == ["aat", "serve"]
    assert not stages[-1].all("CMD")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["aat"] == "aat_serve.cli.main:main"
    from aat_serve.cli.main import build_parser

    args = build_parser().parse_args(json.loads(entry)[1:])
    assert args.command == "serve" and args.func.__module__ == "aat_serve.cli.serve"


def test_dockerfile_environment_is_valid_settings(dockerfile, monkeypatch):
    _, stages = dockerfile
    final = stages[-1]
    env: dict[str, str] = {}
    for args in final.all("ENV"):
        env.update(env_pairs(args))
    aat = {k: v for k, v in env.items() if k.startswith("AAT_")}
    assert set(aat) <= FIELDS
    s = settings_from(aat, monkeypatch)
    assert s.host == "0.0.0.0"  # reachable from outside the container
    assert final.all("EXPOSE") == [str(s.port)]
    (volumes,) = final.all("VOLUME")
    assert set(json.loads(volumes)) == {"/models", str(s.bundle_dir)}


def test_dockerfile_installs_every_package_and_dockerignore_admits_them(dockerfile):
    _, stages = dockerfile
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {src for a in stages[1].all("COPY")
              for src in [w for w in a.split() if not w.startswith("--")][:-1]}
    assert folders | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert copied <= allowed
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()  # an allow-list


def test_dockerfile_healthcheck_polls_healthz_with_python(dockerfile, routes):
    _, stages = dockerfile
    (hc,) = stages[-1].all("HEALTHCHECK")
    cmd = json.loads(hc.split("CMD", 1)[1])
    assert cmd[:2] == ["python", "-c"]
    (path,) = re.findall(r"http://127\.0\.0\.1:%s(/\w+)", cmd[2])
    assert path == "/healthz" and has_route(routes, "GET", path)


# ---- docker-compose.yml ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose():
    return load_yaml(ROOT / "docker-compose.yml")


def compose_env(service: dict, host_env: dict[str, str]) -> dict[str, str]:
    """A service's environment as the container gets it: interpolated; a key without a value
    is passed through from the host only when set there."""
    out = {}
    for k, v in service["environment"].items():
        if v is None:
            if k in host_env:
                out[k] = host_env[k]
            continue
        out[k] = interpolate(str(v), host_env)
    return out


def test_compose_requires_admin_token_and_defaults_no_secret(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    env = compose["services"]["aat"]["environment"]
    assert re.fullmatch(r"\$\{AAT_ADMIN_TOKEN:\?[^}]+\}", env["AAT_ADMIN_TOKEN"])
    with pytest.raises(MissingVariable, match="AAT_ADMIN_TOKEN"):
        interpolate_tree(compose, {"AAT_CHECKPOINT": "/models/x.pth"})
    with pytest.raises(MissingVariable, match="AAT_ADMIN_TOKEN"):  # empty counts as unset
        interpolate_tree(compose, {"AAT_CHECKPOINT": "/models/x.pth", "AAT_ADMIN_TOKEN": ""})
    assert env["AAT_API_TOKEN"] is None  # passed through, never given a value here
    assert defaulted_secrets(text) == []
    assert defaulted_secrets(text + "\n# ${AAT_API_TOKEN:-open}") == ["${AAT_API_TOKEN:-open}"]
    for path in (DEPLOY / "compose.cpu.yml", DEPLOY / "k8s" / "tokens.env.example"):
        assert defaulted_secrets(path.read_text()) == []


def test_compose_environment_is_what_aat_serve_accepts(compose, monkeypatch, routes):
    svc = compose["services"]["aat"]
    assert set(svc["environment"]) <= FIELDS
    assert "command" not in svc and "entrypoint" not in svc  # the image's `aat serve`
    host = {"AAT_ADMIN_TOKEN": ADMIN, "AAT_CHECKPOINT": "/models/audioset_10_10_0.4593.pth"}
    env = compose_env(svc, host)
    assert "AAT_API_TOKEN" not in env
    s = settings_from(env, monkeypatch)
    assert s.host == "0.0.0.0" and s.admin_token == ADMIN and s.api_token is None
    assert svc["expose"] == [str(s.port)]
    assert env | {"AAT_API_TOKEN": "x" * 20} == compose_env(svc, host | {"AAT_API_TOKEN": "x" * 20})
    # volumes: the checkpoint lies under the read-only models mount, the store is the shared one
    mounts = {}
    for v in interpolate_tree(svc["volumes"], host):
        src, dst, *mode = v.split(":")
        mounts[dst] = (src, mode)
    assert mounts["/models"] == ("./models", ["ro"])
    assert str(s.checkpoint).startswith("/models/")
    assert mounts[str(s.bundle_dir)] == ("bundles", [])
    assert "bundles" in compose["volumes"]
    # health-gated: the replicas' health is readiness, and nginx waits for it
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    (path,) = re.findall(r"http://127\.0\.0\.1:%s(/\w+)", test[3])
    assert path == "/readyz" and has_route(routes, "GET", path)
    assert compose["services"]["nginx"]["depends_on"]["aat"]["condition"] == "service_healthy"
    assert svc["stop_grace_period"] == "40s" and s.request_timeout_s < 40


def test_compose_replicas_match_nginx_upstream_and_reserve_a_gpu(compose):
    svc = compose["services"]["aat"]
    replicas = svc["deploy"]["replicas"]
    port = compose_env(svc, {"AAT_ADMIN_TOKEN": ADMIN, "AAT_CHECKPOINT": "/m"})["AAT_PORT"]
    servers = upstream_servers(NGINX_CONF.read_text())
    # compose names replica i "<project>-<service>-<i>"; one name each keeps the hash ring real
    assert [a for a, _ in servers] == [f"{compose['name']}-aat-{i}:{port}"
                                       for i in range(1, replicas + 1)]
    assert all("resolve" in params for _, params in servers)
    (gpu,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    cpu = load_yaml(DEPLOY / "compose.cpu.yml")["services"]["aat"]
    assert cpu["deploy"]["resources"]["reservations"]["devices"] == {"__tag__": "!reset",
                                                                      "value": []}
    assert cpu["environment"] == {"AAT_DEVICE": "cpu"}
    assert cpu["build"]["args"]["BASE_IMAGE"] != dockerfile_stages(
        (ROOT / "Dockerfile").read_text())[0]["BASE_IMAGE"]


def test_compose_mounts_files_that_exist(compose):
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).is_file(), (name, src)
    nginx = compose["services"]["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    # `resolve` in upstream servers needs nginx >= 1.27.3
    major, minor = map(int, re.match(r"nginx:(\d+)\.(\d+)", nginx["image"]).groups())
    assert (major, minor) >= (1, 28)
    # the port nginx publishes is the one it listens on
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", NGINX_CONF.read_text(), re.M)
    assert nginx["ports"] == [f"${{NGINX_PORT:-{listen}}}:{listen}"]


# ---- nginx limits against the settings -------------------------------------------------------

def test_nginx_limits_equal_the_service_defaults():
    conf = NGINX_CONF.read_text()
    s = Settings()

    def location(prefix: str) -> str:
        m = re.search(r"location " + re.escape(prefix) + r" \{(.*?)\n        \}", conf, re.S)
        assert m, prefix
        return m.group(1)

    def mib(block: str) -> float:
        (v,) = re.findall(r"client_max_body_size (\d+)m;", block)
        return float(v)

    classify, tasks = location("/classify/"), location("/tasks")
    assert mib(classify) == s.max_audio_mb
    assert mib(tasks) == s.max_bundle_mb
    # the 413 message names the byte limits the service itself uses
    assert f'"{s.max_audio_bytes} bytes (AAT_MAX_AUDIO_MB)"' in conf
    assert f'"{s.max_bundle_bytes} bytes (AAT_MAX_BUNDLE_MB)"' in conf
    # POST is retried only where it is safe: classification
    assert "non_idempotent" in classify and "non_idempotent" not in tasks
    assert conf.count("non_idempotent") == 1
    # a 503 (not_ready: a replica starting, stopping, or a front end whose model process is
    # gone, tests/service/test_front_end.py) is retried on another replica, classify included
    assert re.search(r"proxy_next_upstream error timeout http_503 non_idempotent;", classify)
    # nginx waits longer than the service's own timeout, so a slow request gets the service's 504
    (read,) = re.findall(r"proxy_read_timeout (\d+)s;", conf)
    assert int(read) > s.request_timeout_s
    assert re.search(r"proxy_next_upstream_tries 2;", conf)


def _uvicorn_run_kwargs(monkeypatch, tmp_path) -> dict:
    """What ``aat serve`` passes to ``uvicorn.run`` (backbone, app and server stubbed)."""
    import inspect

    import uvicorn

    from aat_serve.cli import serve
    from aat_serve.service import app as app_module
    from aat_serve.service import logs, runtime

    captured: dict = {}
    monkeypatch.setattr(logs, "configure_logging", lambda level: None)
    monkeypatch.setattr(runtime, "tune_process", lambda settings: False)
    monkeypatch.setattr(runtime, "load_backbone", lambda settings: None)
    monkeypatch.setattr(runtime, "freeze_heap", lambda: captured.setdefault("order", []).append(
        "freeze_heap"))
    monkeypatch.setattr(app_module, "create_app", lambda settings, checkpoint=None: "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(
        kw, order=[*captured.get("order", []), "uvicorn.run"]))
    from aat_serve.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--checkpoint", str(tmp_path / "ckpt"),
                                      "--bundle-dir", str(tmp_path / "store")])
    assert serve.run(args) == 0
    defaults = {k: p.default for k, p in inspect.signature(uvicorn.Config).parameters.items()}
    return defaults | captured


def test_replicas_write_responses_whole_and_nginx_closes_idle_connections_first(
        monkeypatch, tmp_path):
    """Both keep nginx's retry working when a replica dies: a response is on the wire whole or
    not at all (service/one_write.py), and nginx never reuses a connection the replica is
    closing for being idle (which nginx would count as the replica failing)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from aat_serve.service.http_protocol import GuardedConnection
    from aat_serve.service.one_write import OneWriteResponses

    kw = _uvicorn_run_kwargs(monkeypatch, tmp_path)
    assert issubclass(kw["http"], OneWriteResponses) and issubclass(kw["http"], AutoHTTPProtocol)
    assert issubclass(kw["http"], GuardedConnection)  # and the head timeout, parser errors
    (upstream,) = re.findall(r"upstream aat \{(.*?)\n    \}", NGINX_CONF.read_text(), re.S)
    (idle,) = re.findall(r"^\s*keepalive_timeout (\d+)s;", upstream, re.M)
    assert 0 < int(idle) < kw["timeout_keep_alive"], (idle, kw["timeout_keep_alive"])


def test_aat_serve_freezes_the_start_up_heap_before_serving(monkeypatch, tmp_path):
    kw = _uvicorn_run_kwargs(monkeypatch, tmp_path)
    assert kw["order"] == ["freeze_heap", "uvicorn.run"]


# ---- Prometheus and Grafana ------------------------------------------------------------------

def test_prometheus_scrapes_every_replica_of_the_compose_service(compose, routes):
    prom = load_yaml(DEPLOY / "prometheus.yml")
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "aat"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["aat"] and "aat" in compose["services"]
    assert sd["type"] == "A"  # one record per replica
    assert str(sd["port"]) == compose["services"]["aat"]["environment"]["AAT_PORT"]
    assert has_route(routes, "GET", job["metrics_path"])


def _ensure_samples(metrics: Metrics) -> None:
    """Touch labelled metrics so each has samples and reports its label names."""
    for metric in vars(metrics).values():
        names = getattr(metric, "_labelnames", None)
        if names:
            metric.labels(*["x"] * len(names))


def metric_problems(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Metric names in ``expr`` that the service does not expose, and grouping labels that the
    metrics it groups do not carry (``le`` for histograms, ``instance`` added by Prometheus)."""
    problems = []
    names = set(re.findall(r"\baat_[a-z_]+\b", expr))
    for n in names - set(known):
        problems.append(f"unknown metric {n}")
    labels = {lab.strip() for grp in re.findall(r"by \(([^)]*)\)", expr)
              for lab in grp.split(",")}
    labels |= set(re.findall(r"\b(\w+)(?:=~|!=|=)\"", expr))
    carried = set().union(*(known.get(n, set()) for n in names)) | {"instance", "job"}
    for lab in labels - carried:
        problems.append(f"label {lab} not on {sorted(names)}")
    return problems


def test_grafana_dashboard_queries_only_real_metrics_and_labels():
    m = Metrics()
    _ensure_samples(m)
    known: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            known.setdefault(sample.name, set()).update(sample.labels)
    dash = json.loads((DEPLOY / "grafana" / "aat-serve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    problems = [p for e in exprs for p in metric_problems(e, known)]
    assert problems == []
    # the checker does find a wrong name and a wrong label
    assert metric_problems('sum by (task) (rate(aat_requests{instance=~"$i"}[1m]))', known) \
        == ["unknown metric aat_requests", "label task not on ['aat_requests']"]
    assert metric_problems("sum by (task) (aat_queue_depth)", known) \
        == ["label task not on ['aat_queue_depth']"]
    # what the issue asks the dashboard to show
    joined = "\n".join(exprs)
    for needle in ("sum by (task) (rate(aat_requests_total",
                   "histogram_quantile(0.99, sum by (le) (rate(aat_request_seconds_bucket",
                   "aat_batch_size_sum", "aat_queue_depth", "aat_tasks_resident",
                   "sum by (reason) (rate(aat_rejections_total"):
        assert needle in joined, needle
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# ---- Kubernetes ------------------------------------------------------------------------------

def _k8s_docs() -> dict[str, dict]:
    kust = load_yaml(K8S / "kustomization.yaml")
    docs = {}
    for res in kust["resources"]:
        for doc in load_yaml_all(K8S / res):
            assert doc["kind"] not in docs, doc["kind"]
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_kind_and_generates_the_secret():
    kust = load_yaml(K8S / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    docs = _k8s_docs()
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service",
                         "HorizontalPodAutoscaler"}
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    (gen,) = kust["secretGenerator"]
    assert gen["name"] == "aat-tokens" and gen["envs"] == ["tokens.env"]
    # the template holds names, no values; the real file is never committed
    example = (K8S / "tokens.env.example").read_text()
    pairs = [line.split("=", 1) for line in example.splitlines()
             if line and not line.startswith("#")]
    assert {k for k, _ in pairs} == {"AAT_ADMIN_TOKEN", "AAT_API_TOKEN"} <= FIELDS
    assert all(v == "" for _, v in pairs)
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/tokens.env"], cwd=ROOT)
    assert ignored.returncode == 0
    tracked = subprocess.run(["git", "ls-files", "deploy/k8s/tokens.env"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    assert tracked.stdout == ""


def test_k8s_deployment_probes_ports_env_and_resources(routes, monkeypatch):
    docs = _k8s_docs()
    dep = docs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == load_yaml(K8S / "kustomization.yaml")["images"][0]["name"]
    literal = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]
                   if "valueFrom" in e}
    assert set(literal) | set(from_secret) <= FIELDS
    assert {k: (r["name"], r["key"]) for k, r in from_secret.items()} == {
        "AAT_ADMIN_TOKEN": ("aat-tokens", "AAT_ADMIN_TOKEN"),
        "AAT_API_TOKEN": ("aat-tokens", "AAT_API_TOKEN")}
    assert from_secret["AAT_API_TOKEN"].get("optional") is True
    assert not from_secret["AAT_ADMIN_TOKEN"].get("optional", False)
    s = settings_from(literal, monkeypatch)
    assert s.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": s.port}
    # probes: real routes, on the container's port
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {k: v["path"] for k, v in probes.items()} == {
        "startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for p in probes.values():
        assert has_route(routes, "GET", p["path"]) and p["port"] in ports
    # a GPU requested and limited (extended resources must be equal), memory limited
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(res["limits"]) and {"cpu", "memory"} <= set(res["requests"])
    # non-root, and no injected service-link variables colliding with AAT_PORT & co.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["enableServiceLinks"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] > s.request_timeout_s
    # volumes: the store from the RWX claim at AAT_BUNDLE_DIR, the checkpoint under /models
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[str(s.bundle_dir)]["name"] == "store"
    assert mounts["/models"]["name"] == "store" and mounts["/models"]["readOnly"] is True
    assert str(s.checkpoint).startswith("/models/")
    vols = {v["name"]: v for v in pod["volumes"]}
    pvc = docs["PersistentVolumeClaim"]
    assert vols["store"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "/tmp" in mounts and "emptyDir" in vols[mounts["/tmp"]["name"]]


def test_k8s_service_and_hpa_target_the_deployment():
    docs = _k8s_docs()
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_no_manifest_carries_a_secret_value():
    """Token variables come from the environment or the Secret, never from a file here."""
    for path in [ROOT / "docker-compose.yml", *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]:
        tree = load_yaml(path) if path.suffix in (".yml", ".yaml") else None
        for s in all_strings(tree):
            for ref in references(s):
                if "TOKEN" in ref.name:
                    assert ref.op in (":?", "?"), (path, s)
    dep = _k8s_docs()["Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert all("value" not in e for e in c["env"] if "TOKEN" in e["name"])


# ---- docs ------------------------------------------------------------------------------------

def test_docs_table_lists_every_setting_with_its_default():
    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(AAT_[A-Z_]+)` \| ([^|]+) \|", text, re.M))
    assert set(rows) == FIELDS
    for name, field in Settings.model_fields.items():
        shown = rows[f"AAT_{name.upper()}"].strip()
        if field.default is None:
            assert shown.startswith("("), name
        else:
            default = field.default
            expected = (str(default).lower() if isinstance(default, bool)
                        else f"{default:g}" if isinstance(default, float) else str(default))
            assert shown == f"`{expected}`", name
