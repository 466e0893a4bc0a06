"""Validates the compose stack and the Kubernetes manifests offline with the real tools.

    manifests_check.py ROOT APPLIANCE SCRATCH

- images/compose.yaml through podman-compose's `config` (the Compose implementation the
  project installs; it needs the podman binary, not a running engine), then what `config` does
  not check: every bind mount's source exists, every named volume and secret is declared, the
  monitoring services share the appliance's network namespace (so the shipped configurations'
  localhost addresses hold);
- images/k8s/*.yaml and the GPU overlay's patch, merged as kustomize would, through
  kubernetes-validate's schemas (strict: an unknown field fails) for the oldest and newest
  Kubernetes versions a k3s cell would run; the ServiceMonitor (a CRD without a schema there)
  and the references between the manifests are checked here: selectors, port names, mounted
  ConfigMaps and Secrets and their keys;
- the ConfigMap's appliance.toml and robots.toml through `appliance --check-config`.

Prints one line per check; exits non-zero with the reason on the first failure.
"""

import copy
import pathlib
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(sys.argv[1]).resolve()
APPLIANCE = sys.argv[2]
SCRATCH = pathlib.Path(sys.argv[3])
K8S = ROOT / "images" / "k8s"
# The oldest Kubernetes a supported k3s runs, and the newest the validator knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def fail(why):
    print(f"FAIL {why}", flush=True)
    sys.exit(1)


def check(condition, why):
    if not condition:
        fail(why)


def compose():
    work = SCRATCH / "compose"
    (work / "images" / "secrets").mkdir(parents=True)
    shutil.copy(ROOT / "images" / "compose.yaml", work / "images")
    (work / "monitoring").symlink_to(ROOT / "monitoring")
    for name in ["admin.token", "grafana-admin-password"]:
        (work / "images" / "secrets" / name).write_text("x" * 44 + "\n")
    tool = pathlib.Path(sys.executable).parent / "podman-compose"
    r = subprocess.run(
        [str(tool), "-f", "images/compose.yaml", "config"], cwd=work, capture_output=True, text=True
    )
    check(r.returncode == 0, f"podman-compose config: {r.stdout}{r.stderr}")
    stack = yaml.safe_load(r.stdout)
    services = stack["services"]
    check(
        set(services) == {"cell", "appliance", "prometheus", "alertmanager", "grafana"},
        f"services: {sorted(services)}",
    )
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (work / "images" / source).resolve()
                check(path.exists(), f"{name}: bind mount {source} does not exist")
            else:
                check(source in stack.get("volumes", {}), f"{name}: volume {source} is not declared")
        for secret in service.get("secrets", []):
            secret = secret if isinstance(secret, str) else secret["source"]
            check(secret in stack.get("secrets", {}), f"{name}: secret {secret} is not declared")
        if name != "cell":
            check(
                service.get("network_mode") == "service:cell",
                f"{name}: not in the cell's network namespace",
            )
    appliance = services["appliance"]
    check(
        appliance["environment"]["APPLIANCE_AUTH__ADMIN_TOKEN_FILE"] == "/run/secrets/admin_token",
        "the admin token is not the secret compose mounts",
    )
    # The namespace's holder publishes the ports and never restarts with the appliance.
    check("8443:8443" in services["cell"]["ports"], f"ports: {services['cell'].get('ports')}")
    check("ports" not in appliance, "ports on a service in another's namespace")
    # Prometheus reads the shipped on-cell configuration, whose paths the volume holds.
    prometheus = services["prometheus"]
    check("10001" in [str(g) for g in prometheus.get("group_add", [])], "prometheus is not in the appliance's group")
    shipped = (ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text()
    check("/var/lib/vla-appliance/metrics.token" in shipped, "prometheus.yml reads the token elsewhere")
    check(
        any(v.startswith("appliance-data:/var/lib/vla-appliance") for v in prometheus["volumes"]),
        "prometheus does not mount the appliance's data",
    )
    print("ok compose: podman-compose config and the stack's references")


def documents(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def merge(base, patch):
    """A strategic merge patch as kustomize applies it to these manifests: maps merge,
    `containers` merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if k == "containers":
                merged = []
                for c in base.get(k, []):
                    match = next((p for p in v if p["name"] == c["name"]), None)
                    merged.append(merge(c, match) if match else c)
                out[k] = merged
            else:
                out[k] = merge(base[k], v) if k in base else v
        return out
    return patch


def kubernetes():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    check(set(resources) | {"secrets.example.yaml"} == files, f"kustomization lists {resources}, the directory has {files}")
    docs = {}
    for name in sorted(files):
        for d in documents(name):
            docs[(d["kind"], d["metadata"]["name"])] = d
    # The generated ConfigMap, as kustomize makes it (without the hash suffix it appends to the
    # name and to every reference).
    for generator in kustomization["configMapGenerator"]:
        data = {f: (K8S / f).read_text() for f in generator["files"]}
        metadata = {"name": generator["name"], "labels": generator.get("options", {}).get("labels", {})}
        docs[("ConfigMap", generator["name"])] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
    monitoring = yaml.safe_load((K8S / "monitoring" / "kustomization.yaml").read_text())
    check(monitoring["resources"] == ["..", "servicemonitor.yaml"], f"the monitoring overlay: {monitoring['resources']}")
    for d in [d for d in yaml.safe_load_all((K8S / "monitoring" / "servicemonitor.yaml").read_text()) if d]:
        docs[(d["kind"], d["metadata"]["name"])] = d
    statefulset = docs[("StatefulSet", "vla-appliance")]

    gpu = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    check(gpu["resources"] == [".."], "the GPU overlay is not on the base")
    patch = yaml.safe_load((K8S / "gpu" / gpu["patches"][0]["path"]).read_text())
    gpu_statefulset = merge(copy.deepcopy(statefulset), patch)
    limits = gpu_statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    check(limits.get("nvidia.com/gpu") == 1 and "memory" in limits, f"GPU limits: {limits}")
    check(
        [i["name"] for i in gpu["images"]] == [statefulset["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0]],
        "the GPU overlay renames another image",
    )

    for version in VERSIONS:
        checked = 0
        for (kind, name), d in list(docs.items()) + [(("StatefulSet", "vla-appliance (gpu)"), gpu_statefulset)]:
            if kind == "ServiceMonitor":
                continue
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{kind}/{name} against Kubernetes {version}: {e.message} at {list(e.path)}")
            checked += 1
        print(f"ok kubernetes-validate {version}: {checked} resources (strict)")

    # References between the manifests.
    pod = statefulset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    check(statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the selector misses the pods")
    container = pod["spec"]["containers"][0]
    ports = {p["name"] for p in container["ports"]}
    service = docs[("Service", "vla-appliance")]
    check(service["spec"]["selector"].items() <= labels.items(), "the Service selects no pod")
    check({p["targetPort"] for p in service["spec"]["ports"]} <= ports, "the Service targets an unnamed port")
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        action = container[probe].get("httpGet") or container[probe].get("tcpSocket")
        check(action["port"] in ports, f"{probe} names port {action['port']}")
    check(statefulset["spec"]["serviceName"] == service["metadata"]["name"], "serviceName is not the Service")
    secrets = {n: d for (k, n), d in docs.items() if k == "Secret"}
    configmaps = {n: d for (k, n), d in docs.items() if k == "ConfigMap"}
    for volume in pod["spec"]["volumes"]:
        if "secret" in volume:
            check(volume["secret"]["secretName"] in secrets, f"volume {volume['name']}: no such Secret")
        if "configMap" in volume and not volume["configMap"].get("optional"):
            check(volume["configMap"]["name"] in configmaps, f"volume {volume['name']}: no such ConfigMap")
    mounts = {m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    check(mounts <= {v["name"] for v in pod["spec"]["volumes"]} | claims, f"mounts without volumes: {mounts}")
    monitor = docs[("ServiceMonitor", "vla-appliance")]
    check(monitor["apiVersion"] == "monitoring.coreos.com/v1", monitor["apiVersion"])
    check(monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(), "the ServiceMonitor selects no Service")
    endpoint = monitor["spec"]["endpoints"][0]
    check(endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, "the ServiceMonitor names no Service port")
    credentials = endpoint["authorization"]["credentials"]
    check(credentials["key"] in secrets[credentials["name"]]["stringData"], "the metrics token is no key of its Secret")
    ca = endpoint["tlsConfig"]["ca"]["secret"]
    check(ca["key"] in secrets[ca["name"]]["stringData"], "the CA is no key of its Secret")
    print("ok kubernetes references: selectors, ports, probes, volumes, secrets, ServiceMonitor")

    # Every absolute path the configuration names is under a mount that provides it.
    config = configmaps["vla-appliance-config"]["data"]
    mount_paths = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for path in re.findall(r'"(/[^"]+)"', config["appliance.toml"]):
        under = [n for n, m in mount_paths.items() if path == m or path.startswith(m.rstrip("/") + "/")]
        check(under, f"appliance.toml names {path}, which no volume mount provides")
        volume = next((v for v in pod["spec"]["volumes"] if v["name"] == under[0]), None)
        name = pathlib.PurePosixPath(path).name
        if volume and "secret" in volume:
            keys = secrets[volume["secret"]["secretName"]]["stringData"]
            check(name in keys, f"{path}: no key {name} in Secret {volume['secret']['secretName']}")
        if volume and "configMap" in volume and volume["configMap"]["name"] in configmaps:
            check(name in configmaps[volume["configMap"]["name"]]["data"], f"{path}: not in its ConfigMap")
    # The ConfigMap's configuration, as the appliance reads it, with its paths moved here.
    work = SCRATCH / "k8s"
    (work / "tls").mkdir(parents=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=vla-appliance.vla-cell.svc", "-days", "1",
         "-keyout", str(work / "tls" / "tls.key"), "-out", str(work / "tls" / "tls.crt")],
        check=True, capture_output=True,
    )
    (work / "robots.toml").write_text(config["robots.toml"])
    toml = (
        config["appliance.toml"]
        .replace("/run/secrets/vla-tls/", f"{work}/tls/")
        .replace("/etc/vla-appliance/", f"{work}/")
        .replace("/var/lib/vla-appliance", f"{work}/data")
        .replace("/run/secrets/vla/", f"{work}/")
    )
    (work / "appliance.toml").write_text(toml)
    r = subprocess.run(
        [APPLIANCE, "--config", str(work / "appliance.toml"), "--check-config"],
        cwd=ROOT, capture_output=True, text=True,
    )
    check(r.returncode == 0, f"appliance --check-config on the ConfigMap: {r.stderr}")
    check(f'robots_file = "{work}/robots.toml"' in r.stdout, r.stdout)
    check(r.stdout.count("[[policy.preload]]") == 4, "the ConfigMap does not preload the four shipped policies")
    print("ok the ConfigMap's appliance.toml and robots.toml pass appliance --check-config")


compose()
kubernetes()
