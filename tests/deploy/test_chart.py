"""The Helm chart (config/helm/kvd) and the plain manifests (config/kubernetes), checked.

Why: a chart that renders is not yet one that a cluster accepts, nor one whose kvd starts. So
the chart is rendered by Helm's own Go SDK (helm-python-sdk; no helm binary here), every object
is validated in strict mode against the Kubernetes OpenAPI schemas of the oldest and newest
release the chart supports (kubernetes-validate), the Prometheus Operator objects against
their CRD models, the references between objects are followed (volumes, ports, selectors), the
rendered kvd.toml is loaded by the real kvd, and the daemon started from it answers the probes
the DaemonSet declares. Bad values must fail at render with a message naming what to fix.

Run by scripts/deploy-check.sh (in its venv, from scripts/deploy-env.sh) and by the test suite.
KVD_DEPLOY_BLESS=1 rewrites config/kubernetes/*.yaml from the chart instead of comparing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.cert_manager import v1 as cert_manager
from cloudcoil.models.prometheus_operator import v1 as monitoring

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "config" / "helm" / "kvd"
PLAIN = ROOT / "config" / "kubernetes"
KUBE_VERSIONS = ("1.29.0", "1.37.0")
RELEASE, NAMESPACE = "kvd", "kvd-system"
# Keys of config/kvd.toml the chart sets itself (and refuses in `config`).
OWNED = {
    ("server", "socket_path"),
    ("disk", "path"),
    ("metrics", "listen"),
    ("peer", "listen"),
    ("peer", "advertise"),
    ("peer", "tls"),
    ("peer", "tls_cert"),
    ("peer", "tls_key"),
    ("peer", "tls_ca"),
    ("index", "node_id"),
}

# Every optional part on: disk tier, index from a Secret, peer port, events, ServiceMonitor,
# explicit huge pages, the example vLLM Deployment.
FULL = {
    "config": {
        "server": {"allowed_uids": [1000, 1001], "socket_mode": 438, "shutdown_drain_ms": 30000},
        "dram": {
            "arena_bytes": "2 GiB",
            "max_namespaces": 2,
            "huge_pages": "explicit",
            "high_watermark": 0.9,
            "low_watermark": 0.85,
        },
        "disk": {"capacity_bytes": "100 GiB", "region_bytes": "256 MiB", "engine": "psync"},
        "index": {"key_prefix": "prod", "lease_ttl_ms": 15000},
        "events": {"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "form": "map"},
        "gpu": {"backend": "host", "pin_threads": 4, "pin_chunk_bytes": "512 MiB"},
        "s3": {"bucket": "kv-cache", "endpoint": "http://127.0.0.1:9", "path_style": True,
               "segment_bytes": "64 MiB", "write_mode": "write-through"},
        "log": {"level": "kvd=debug,info", "format": "json"},
    },
    "s3": {"credentialsSecret": {"name": "kvd-s3"}},
    "disk": {"hostPath": "/mnt/nvme0/kvd"},
    "peer": {"enabled": True, "port": 7470, "tls": {
        "secretName": "kvd-peer-tls",
        "certManager": {"enabled": True, "issuerRef": {"name": "cluster-ca"},
                        "dnsNames": ["gpu-node-1", "gpu-node-2"]},
    }},
    "index": {"redisUrlsSecret": {"name": "kvd-redis", "key": "urls"}},
    "metrics": {"port": 9100, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "resources": {
        "requests": {"cpu": "4", "memory": "1Gi", "hugepages-2Mi": "4Gi"},
        "limits": {"memory": "1Gi", "hugepages-2Mi": "4Gi"},
    },
    "terminationGracePeriodSeconds": 45,
    "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/kvd-io-uring.json"},
    "vllmExample": {
        "enabled": True,
        "extraArgs": ["--max-model-len", "4096"],
        "connectorConfig": {"tenant": "team-a", "timeout_s": 2},
    },
}


def render(values: dict | None = None) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".txt"):
            continue
        out.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def validate(obj: dict) -> None:
    """Strict schema validation: the Kubernetes schemas of each supported release, or the
    Prometheus Operator's models (unknown fields show up as a difference after the round
    trip, since the models drop what they do not know)."""
    crds = {"monitoring.coreos.com": monitoring, "cert-manager.io": cert_manager}
    group = obj["apiVersion"].split("/")[0]
    if group in crds:
        model = getattr(crds[group], obj["kind"])
        parsed = model.model_validate(obj)
        back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert back == obj, f"{obj['kind']} has fields its CRD does not know: {obj} vs {back}"
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes {version}: "
                f"{'.'.join(str(p) for p in e.path)}: {e.message}"
            ) from None


def check_references(objs: list[dict]) -> None:
    """What the schemas cannot see: names that must point at something."""
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for o in objs:
        assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]
    for w in by_kind(objs, "DaemonSet") + by_kind(objs, "Deployment"):
        spec = w["spec"]["template"]["spec"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        for k, v in w["spec"]["selector"]["matchLabels"].items():
            assert labels.get(k) == v, f"{w['kind']} selector {k}={v} does not match its pods"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        sa = spec.get("serviceAccountName")
        if sa:
            assert ("ServiceAccount", sa) in names, f"ServiceAccount {sa} is not rendered"
        for v in volumes.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, v
        for c in spec.get("initContainers", []) + spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    port = c[probe]["httpGet"]["port"]
                    assert port in ports, f"{c['name']} {probe} uses unknown port {port}"
    pods = [
        w["spec"]["template"]["metadata"]["labels"]
        for w in by_kind(objs, "DaemonSet") + by_kind(objs, "Deployment")
    ]
    for m in by_kind(objs, "PodMonitor"):
        sel = m["spec"]["selector"]["matchLabels"]
        assert any(all(p.get(k) == v for k, v in sel.items()) for p in pods), m
    for s in by_kind(objs, "Service"):
        sel = s["spec"]["selector"]
        assert any(all(p.get(k) == v for k, v in sel.items()) for p in pods), s
    for m in by_kind(objs, "ServiceMonitor"):
        sel = m["spec"]["selector"]["matchLabels"]
        svcs = [s for s in by_kind(objs, "Service") if sel.items() <= s["metadata"]["labels"].items()]
        assert svcs, f"ServiceMonitor selects no Service: {sel}"
        ports = {p["name"] for s in svcs for p in s["spec"]["ports"]}
        assert all(e["port"] in ports for e in m["spec"]["endpoints"]), m


def kvd_container(objs: list[dict]) -> dict:
    (ds,) = by_kind(objs, "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c


def kvd_toml(objs: list[dict]) -> str:
    (cm,) = by_kind(objs, "ConfigMap")
    return cm["data"]["kvd.toml"]


def kvd_bin() -> Path:
    d = os.environ.get("KVD_BIN_DIR") or str(
        Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/kvd/target")) / "debug"
    )
    b = Path(d) / "kvd"
    if not b.exists():
        pytest.fail(f"{b} not found: run `cargo build --workspace --bins` (or set KVD_BIN_DIR)")
    return b


def pod_env(container: dict) -> dict[str, str]:
    """The container's KVD_* environment as the kubelet would set it on node `node-a`."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"].replace("$(POD_IP)", "10.1.2.3")
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[e["name"]] = "node-a"
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = "redis://:hunter2@redis.kvd-system:6379"
    return {k: v for k, v in env.items() if k.startswith("KVD_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# --- tests ---------------------------------------------------------------------------------


def test_chart_lints_clean():
    for values in ({}, FULL):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
        assert not report["errors"], report
        bad = [m for m in report["messages"] if m["severity"] >= 2]
        assert not bad, bad


@pytest.mark.parametrize("name,values", [("defaults", {}), ("full", FULL)])
def test_rendered_objects_are_valid_kubernetes(name, values):
    objs = objects(render(values))
    kinds = sorted(o["kind"] for o in objs)
    if name == "defaults":
        assert kinds == ["ConfigMap", "DaemonSet", "NetworkPolicy", "ServiceAccount"], kinds
    else:
        assert kinds == [
            "Certificate", "ConfigMap", "DaemonSet", "Deployment", "NetworkPolicy", "Service",
            "ServiceAccount", "ServiceMonitor",
        ], kinds
    for o in objs:
        validate(o)
    check_references(objs)
    c = kvd_container(objs)
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    (sa,) = by_kind(objs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    ds = by_kind(objs, "DaemonSet")[0]["spec"]["template"]["spec"]
    assert ds["automountServiceAccountToken"] is False
    assert ds["tolerations"] and ds["nodeSelector"]
    sockets = [v for v in ds["volumes"] if v["name"] == "socket-dir"]
    assert sockets[0]["hostPath"]["path"] == "/run/kvd"


def test_full_render_wires_every_part():
    objs = objects(render(FULL))
    c = kvd_container(objs)
    env = {e["name"]: e for e in c["env"]}
    assert env["KVD_PEER_ADVERTISE"]["value"] == "$(POD_IP):7470"
    assert env["KVD_INDEX_REDIS_URLS"]["valueFrom"]["secretKeyRef"] == {"name": "kvd-redis", "key": "urls"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "kvd-s3", "key": "access-key-id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "kvd-s3", "key": "secret-access-key"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9100, "peer": 7470}
    assert c["resources"]["limits"]["hugepages-2Mi"] == "4Gi"
    ds = by_kind(objs, "DaemonSet")[0]["spec"]["template"]["spec"]
    assert ds["terminationGracePeriodSeconds"] == 45
    nvme = [v for v in ds["volumes"] if v["name"] == "nvme"][0]
    assert nvme["hostPath"]["path"] == "/mnt/nvme0/kvd"
    cfg = tomllib.loads(kvd_toml(objs))
    assert cfg["disk"]["path"] == "/var/lib/kvd" and cfg["disk"]["capacity_bytes"] == "100 GiB"
    assert cfg["metrics"]["listen"] == "0.0.0.0:9100"
    assert cfg["peer"]["listen"] == "0.0.0.0:7470"
    assert cfg["server"]["allowed_uids"] == [1000, 1001] and cfg["server"]["socket_mode"] == 438
    assert cfg["server"]["allowed_gids"] == [65532]
    assert cfg["peer"]["tls"] == "mutual" and cfg["peer"]["tls_ca"] == "/etc/kvd/tls/ca.crt"
    tls = {m["name"]: m for m in c["volumeMounts"]}["peer-tls"]
    assert tls["mountPath"] == "/etc/kvd/tls" and tls["readOnly"]
    (secret,) = [v["secret"] for v in ds["volumes"] if v["name"] == "peer-tls"]
    assert secret["secretName"] == "kvd-peer-tls"
    (cert,) = by_kind(objs, "Certificate")
    assert cert["spec"]["secretName"] == "kvd-peer-tls"
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
    assert cert["spec"]["dnsNames"] == ["gpu-node-1", "gpu-node-2"]
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"

    (vllm,) = by_kind(objs, "Deployment")
    spec = vllm["spec"]["template"]["spec"]
    (engine,) = spec["containers"]
    args = engine["args"]
    transfer = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "KvdConnector"
    assert transfer["kv_connector_module_path"] == "kvd.connector"
    assert transfer["kv_load_failure_policy"] == "recompute"
    assert transfer["kv_connector_extra_config"] == {
        "socket": "/run/kvd/kvd.sock", "tenant": "team-a", "timeout_s": 2,
    }
    assert args[-2:] == ["--max-model-len", "4096"]
    mounts = {m["name"]: m["mountPath"] for m in engine["volumeMounts"]}
    assert mounts["kvd-socket"] == "/run/kvd"
    engine_env = {e["name"]: e["value"] for e in engine["env"]}
    assert engine_env["PYTHONPATH"] == mounts["kvd-python"]
    assert engine_env["KVD_SERVER_UID"] == "65532"
    assert spec["securityContext"]["runAsGroup"] == 65532 and spec["securityContext"]["runAsNonRoot"]
    (init,) = spec["initContainers"]
    assert init["command"][-1] == "/kvd-python/"
    # The engine pods land where kvd runs.
    assert spec["nodeSelector"] == ds["nodeSelector"] and spec["tolerations"] == ds["tolerations"]


def test_cuda_backend_sees_the_gpus_without_taking_one():
    values = {"config": {"gpu": {"backend": "cuda"}}}
    objs = objects(render(values))
    for o in objs:
        validate(o)
    ds = by_kind(objs, "DaemonSet")[0]["spec"]["template"]["spec"]
    assert ds["runtimeClassName"] == "nvidia"
    c = kvd_container(objs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert not any("nvidia.com/gpu" in str(r) for r in c["resources"].values())
    # Without the CUDA backend: neither.
    objs = objects(render({}))
    assert "runtimeClassName" not in by_kind(objs, "DaemonSet")[0]["spec"]["template"]["spec"]
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in kvd_container(objs)["env"]}


@pytest.mark.parametrize("name,values", [("defaults", {}), ("full", FULL)])
def test_rendered_config_is_accepted_by_kvd(name, values, tmp_path):
    objs = objects(render(values))
    cfg = tmp_path / "kvd.toml"
    cfg.write_text(kvd_toml(objs))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVD_")}, **pod_env(kvd_container(objs))}
    r = subprocess.run(
        [kvd_bin(), "--check-config", "--config", cfg], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    effective = tomllib.loads(r.stdout)
    assert effective["index"]["node_id"] == "node-a"
    assert effective["server"]["socket_path"] == "/run/kvd/kvd.sock"
    if name == "full":
        assert effective["peer"]["advertise"] == "10.1.2.3:7470"
        assert effective["index"]["redis_urls"][0].endswith("redis.kvd-system:6379")
        assert "hunter2" not in r.stdout + r.stderr
        assert effective["dram"]["huge_pages"] == "explicit"
        assert effective["disk"]["capacity_bytes"] == 100 << 30
        assert effective["s3"]["bucket"] == "kv-cache" and effective["s3"]["write_mode"] == "write-through"


def test_daemon_from_rendered_config_answers_the_probes(tmp_path):
    """kvd started from the chart's ConfigMap (only the socket and the metrics address moved to
    this test's own places) answers the DaemonSet's probes on the paths they name, and exits
    cleanly on SIGTERM."""
    objs = objects(render({"config": {"dram": {"arena_bytes": "64 MiB", "max_namespaces": 1}},
                           "resources": {"limits": {"memory": "512Mi"}}}))
    c = kvd_container(objs)
    cfg = tmp_path / "kvd.toml"
    cfg.write_text(kvd_toml(objs))
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVD_")}, **pod_env(c)}
    proc = subprocess.Popen(
        [kvd_bin(), "--config", cfg, "--set", f"server.socket_path={tmp_path / 'kvd.sock'}",
         "--set", f"metrics.listen=127.0.0.1:{port}", "--set", "log.format=text"],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        probes = {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(f"http://127.0.0.1:{port}{probes['startupProbe']}") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "kvd never answered its startup probe"
            time.sleep(0.05)
        for probe, path in probes.items():
            assert get(f"http://127.0.0.1:{port}{path}") == 200, probe
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Pod Security Standards, "baseline" level: what each control forbids
# (https://kubernetes.io/docs/concepts/security/pod-security-standards/), checked on a pod spec.
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                 "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def baseline_violations(spec: dict) -> set[str]:
    """The baseline controls a pod spec breaks, as "control: detail"."""
    out = set()
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.add(f"host namespaces: {key}")
    for v in spec.get("volumes", []):
        if "hostPath" in v:
            out.add(f"hostPath volume: {v['name']}")
    contexts = [("pod", spec.get("securityContext", {}))]
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        contexts.append((c["name"], sc))
        if sc.get("privileged"):
            out.add(f"privileged: {c['name']}")
        for cap in set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPS:
            out.add(f"capability {cap}: {c['name']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.add(f"host ports: {c['name']}")
        if sc.get("procMount", "Default") != "Default":
            out.add(f"/proc mount: {c['name']}")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.add(f"host process: {c['name']}")
    for who, sc in contexts:
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            out.add(f"seccomp Unconfined: {who}")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            out.add(f"AppArmor Unconfined: {who}")
        se = sc.get("seLinuxOptions", {})
        if se.get("user") or se.get("role") or se.get("type", "container_t") not in (
                "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            out.add(f"SELinux options: {who}")
    if spec.get("securityContext", {}).get("sysctls"):
        out.add("sysctls")
    return out


@pytest.mark.parametrize("ipc_lock", [True, False])
def test_pods_are_non_root_and_break_baseline_only_for_the_host_socket(ipc_lock):
    """kvd runs as a non-root user with IPC_LOCK at most; the engine example as a non-root
    user in kvd's group with the socket directory read-only. Each breaks the Pod Security
    "baseline" level only where the design needs it (docs/security.md): the hostPath of the
    node's socket (and NVMe) directory, and IPC_LOCK while ipcLock is on."""
    values = {**FULL, "ipcLock": ipc_lock}
    objs = objects(render(values))
    ds = by_kind(objs, "DaemonSet")[0]["spec"]["template"]["spec"]
    expected = {"hostPath volume: socket-dir", "hostPath volume: nvme"}
    if ipc_lock:
        expected.add("capability IPC_LOCK: kvd")
    assert baseline_violations(ds) == expected
    c = kvd_container(objs)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532 and sc["runAsGroup"] == 65532
    assert sc["capabilities"] == ({"drop": ["ALL"], "add": ["IPC_LOCK"]} if ipc_lock else {"drop": ["ALL"]})
    (init,) = ds["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert "chown 65532:65532 /run/kvd /var/lib/kvd" in init["command"][-1]
    assert "chmod 0750 /run/kvd" in init["command"][-1]

    (vllm,) = by_kind(objs, "Deployment")
    spec = vllm["spec"]["template"]["spec"]
    assert baseline_violations(spec) == {"hostPath volume: kvd-socket"}
    # "restricted" beyond that: non-root, no escalation, no capabilities, RuntimeDefault.
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for ct in spec["initContainers"] + spec["containers"]:
        assert ct["securityContext"]["allowPrivilegeEscalation"] is False, ct["name"]
        assert ct["securityContext"]["capabilities"] == {"drop": ["ALL"]}, ct["name"]
    socket = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "kvd-socket"]
    assert socket[0]["readOnly"] is True


def test_network_policy_admits_only_whom_each_port_is_for():
    objs = objects(render(FULL))
    (np,) = by_kind(objs, "NetworkPolicy")
    spec = np["spec"]
    (ds,) = by_kind(objs, "DaemonSet")
    (vllm,) = by_kind(objs, "Deployment")
    sel = spec["podSelector"]["matchLabels"]
    kvd_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert sel.items() <= kvd_labels.items(), "selects the kvd pods"
    assert not sel.items() <= vllm["spec"]["template"]["metadata"]["labels"].items(), "not the engines"
    assert spec["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in r["ports"]): r["from"] for r in spec["ingress"]}
    assert rules[(9100,)] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    assert rules[(7470,)] == [{"podSelector": {"matchLabels": sel}}], "peers: kvd pods only"
    assert rules[(5557, 5558)][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "llm-d-kv-cache-indexer"}
    assert len(rules) == 3
    # Defaults: metrics only (no peer port, no events bound); events kvd dials get no rule.
    for values in ({}, {"config": {"events": {"endpoint": "tcp://indexer.llm-d:5557"}}}):
        (np,) = by_kind(objects(render(values)), "NetworkPolicy")
        assert [[p["port"] for p in r["ports"]] for r in np["spec"]["ingress"]] == [[9464]]
    assert not by_kind(objects(render({"networkPolicy": {"enabled": False}})), "NetworkPolicy")


BAD = [
    ({"config": {"dram": {"arena_bytes": "lots"}}}, ["/config/dram/arena_bytes"]),
    ({"config": {"server": {"socket_path": "/tmp/x.sock"}}}, ["/config/server", "socket_path"]),
    ({"config": {"metrics": {"listen": "0.0.0.0:1"}}}, ["metrics"]),
    ({"config": {"dsik": {"capacity_bytes": 1}}}, ["dsik"]),
    ({"config": {"log": {"format": "xml"}}}, ["/config/log/format", "text", "json"]),
    ({"config": {"server": {"max_clients": "many"}}}, ["/config/server/max_clients"]),
    ({"metrics": {"port": 70000}}, ["/metrics/port"]),
    ({"image": {"pullPolicy": "Sometimes"}}, ["/image/pullPolicy"]),
    ({"disk": {"hostPath": "relative/dir"}}, ["/disk/hostPath"]),
    ({"socketDir": ""}, ["/socketDir"]),
    ({"vllmExample": {"connectorConfig": {"socket": "/x"}}}, ["/vllmExample/connectorConfig"]),
    ({"replicas": 3}, ["replicas"]),
    ({"config": {"disk": {"capacity_bytes": "100 GiB"}}}, ["disk.hostPath"]),
    ({"resources": {"limits": {"memory": "2Gi"}}}, ["resources.limits.memory", "4096 MiB"]),
    ({"resources": {"limits": {"memory": "lots"}}}, ["resources.limits.memory", "lots"]),
    ({"resources": {"limits": {"memory": None}}}, ["resources.limits.memory is not set"]),
    ({"config": {"dram": {"arena_bytes": "8 GiB"}}}, ["resources.limits.memory", "32768 MiB"]),
    ({"config": {"dram": {"huge_pages": "explicit"}}}, ["hugepages-2Mi"]),
    ({"config": {"dram": {"huge_pages": "explicit"}},
      "resources": {"limits": {"memory": "1Gi", "hugepages-2Mi": "1Gi"}}}, ["hugepages-2Mi", "4096 MiB"]),
    ({"terminationGracePeriodSeconds": 10}, ["terminationGracePeriodSeconds", "shutdown_drain_ms"]),
    ({"config": {"server": {"shutdown_drain_ms": 60000}}}, ["terminationGracePeriodSeconds (30)", "60000"]),
    ({"metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}, ["twice"]),
    ({"peer": {"enabled": True, "port": 9464, "tls": {"mode": "off"}}}, ["peer.port and metrics.port"]),
    ({"peer": {"enabled": True}}, ["peer.tls.secretName", "peer.tls.mode=off"]),
    ({"peer": {"tls": {"mode": "maybe"}}}, ["/peer/tls/mode"]),
    ({"peer": {"tls": {"certManager": {"enabled": True}}}}, ["issuerRef.name", "dnsNames"]),
    ({"runAs": {"user": 0}}, ["/runAs/user"]),
]


@pytest.mark.parametrize("values,words", BAD, ids=[json.dumps(v)[:60] for v, _ in BAD])
def test_bad_values_fail_at_render_naming_the_value(values, words):
    with pytest.raises(helm.HelmError) as e:
        render(values)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in the error: {msg}"


def test_good_edge_values_render():
    # Within limits exactly, quantities in every unit the checks parse, drain off.
    for values in (
        {"resources": {"limits": {"memory": "4352Mi"}}},
        {"resources": {"limits": {"memory": "5G"}}},
        {"resources": {"limits": {"memory": 5368709120}}},
        {"config": {"dram": {"arena_bytes": 268435456}}, "resources": {"limits": {"memory": "1280Mi"}}},
        {"config": {"server": {"shutdown_drain_ms": 0}}, "terminationGracePeriodSeconds": 5},
        {"config": {"index": {"redis_urls": "redis://10.0.0.5:6379"}}},
    ):
        for o in objects(render(values)):
            validate(o)


def test_schema_config_keys_match_kvd_toml():
    """Every key of config/kvd.toml can be set through `config`, except the ones the chart
    owns, and nothing else can: the schema and the daemon do not drift apart."""
    example = tomllib.loads((ROOT / "config" / "kvd.toml").read_text())
    want = {(s, k) for s, keys in example.items() for k in keys} - OWNED
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    have = {(s, k) for s, sec in schema["properties"].items() for k in sec["properties"]}
    assert have == want, f"missing: {sorted(want - have)}, unknown: {sorted(have - want)}"


def test_every_value_is_documented():
    """Each top-level key of values.yaml has a comment above it or belongs to a commented
    group."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z]", line):
            above = lines[i - 1] if i else ""
            inner = [l for l in lines[i + 1 : i + 4] if l.strip().startswith("#")]
            if not above.startswith("#") and not inner:
                undocumented.append(line)
    assert not undocumented, undocumented


def plain_manifests() -> dict[str, str]:
    """config/kubernetes/*.yaml as rendered from the chart with config/kubernetes/values.yaml."""
    values = yaml.safe_load((PLAIN / "values.yaml").read_text())
    rendered = render(values)
    groups = {
        "kvd.yaml": ["serviceaccount.yaml", "configmap.yaml", "daemonset.yaml", "networkpolicy.yaml"],
        "monitoring.yaml": ["monitoring.yaml"],
        "vllm-example.yaml": ["vllm-example.yaml"],
    }
    header = (
        "# Generated from the Helm chart config/helm/kvd with config/kubernetes/values.yaml\n"
        "# (release \"kvd\", namespace \"kvd-system\"). Do not edit: change the chart or the values and\n"
        "# run `KVD_DEPLOY_BLESS=1 scripts/deploy-check.sh`.\n"
    )
    out = {}
    for name, templates in groups.items():
        docs = []
        for t in templates:
            text = rendered[f"kvd/templates/{t}"].strip()
            if text:
                docs.append(text.replace("app.kubernetes.io/managed-by: Helm", "app.kubernetes.io/managed-by: kubectl"))
        out[name] = header + "---\n" + "\n---\n".join(docs) + "\n"
    return out


def test_plain_manifests_match_the_chart():
    want = plain_manifests()
    if os.environ.get("KVD_DEPLOY_BLESS") == "1":
        for name, text in want.items():
            (PLAIN / name).write_text(text)
    stale = [n for n, t in want.items() if not (PLAIN / n).exists() or (PLAIN / n).read_text() != t]
    assert not stale, f"{stale} differ from the chart: run KVD_DEPLOY_BLESS=1 scripts/deploy-check.sh"
    objs = []
    for name in want:
        objs.extend(d for d in yaml.safe_load_all((PLAIN / name).read_text()) if d)
    ns = yaml.safe_load((PLAIN / "namespace.yaml").read_text())
    validate(ns)
    assert ns["metadata"]["name"] == NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/audit"] == "baseline"
    for o in objs:
        validate(o)
    check_references(objs)

