#!/usr/bin/env python3
"""Validates the rendered Kubernetes manifests and the Grafana dashboard (run by ci.sh).

    validate.py --flex target/debug/flex --dashboard deploy/grafana/flexinference.json \
        --metrics deploy/grafana/metrics.txt RENDERED.yaml [RENDERED.yaml …]

Each RENDERED.yaml is the output of `kubectl kustomize` (the base, the example overlay). Checks:

- every resource against the Kubernetes OpenAPI schemas, strictly (kubernetes-validate, offline,
  for the oldest and the newest version named below), the ServiceMonitor against the fields of
  monitoring.coreos.com/v1 it uses (SERVICE_MONITOR below);
- what the deployment must do: the proxy's probes, preStop and a termination grace that covers
  the drain, metrics on their own port and Service and scraped by the ServiceMonitor, the HPA
  and PDB on the proxies, the NetworkPolicy's destinations, secrets from Secrets, the
  restricted Pod Security Standard;
- every FLEX_* variable is read by `flex <command> --help`, and the whole environment goes
  through the real binary's argument parser;
- the dashboard parses, each query is valid PromQL (promql-parser) and names only the series
  and labels of metrics.txt, and each series there is used.

Then it breaks copies on purpose (no preStop, a short grace, a bad field, an unknown variable,
an open egress rule, an unknown series) and requires each to be caught. Prints one line per
group and `N passed, M failed`; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import promql_parser
import yaml

# The Kubernetes versions the manifests are validated for: the oldest still common, and the
# newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

# Variables the manifests may set ahead of the binary, as (command, name): none today. A name
# here that `flex CMD --help` already lists is an error (remove it from here); any other
# unknown name is an error too.
PENDING: set[tuple[str, str]] = set()

# FLEX_LOG is the log filter every command reads (src/telemetry.rs), not a flag.
NOT_A_FLAG = {"FLEX_LOG"}

# The fields of monitoring.coreos.com/v1 ServiceMonitor the manifests use, typed as the CRD
# types them; anything else is refused (as kubectl's strict field validation would with the
# CRD installed).
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
SERVICE_MONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": LABEL_SELECTOR,
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}

# Labels Prometheus (and the Operator) add to every series.
TARGET_LABELS = {"instance", "job", "pod", "namespace", "service", "container", "endpoint"}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def group(self, name: str, errors: list[str], checks: int) -> None:
        if errors:
            self.failed += 1
            print(f"FAIL {name}:")
            for e in errors:
                print(f"  - {e}")
        else:
            self.passed += 1
            print(f"ok   {name} ({checks} checks)")


# ----- the manifests --------------------------------------------------------------------------


def load(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if not docs:
        raise SystemExit(f"{path}: no resources (did kustomize render anything?)")
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    for d in docs:
        if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
            return d
    return None


def selects(selector: dict, labels: dict) -> bool:
    want = selector.get("matchLabels", {})
    return bool(want) and all(labels.get(k) == v for k, v in want.items())


def schema_errors(docs: list[dict]) -> list[str]:
    errors = []
    for d in docs:
        what = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if d.get("kind") == "ServiceMonitor":
            for e in jsonschema.Draft7Validator(SERVICE_MONITOR).iter_errors(d):
                errors.append(f"{what}: {'/'.join(map(str, e.path))}: {e.message}")
            continue
        for v in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{what}: no schema for {d.get('apiVersion')} in Kubernetes {v}")
            except kubernetes_validate.ValidationError as e:
                path = "/".join(map(str, e.path))
                errors.append(f"{what} (Kubernetes {v}): {path}: {e.message}")
    return errors


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: dict, name: str) -> str | None:
    e = env_of(container).get(name)
    return None if e is None else e.get("value")


def port_named(container: dict, name: str) -> int | None:
    for p in container.get("ports", []):
        if p.get("name") == name:
            return p.get("containerPort")
    return None


def listen_port(addr: str | None) -> int | None:
    if not addr or ":" not in addr:
        return None
    try:
        return int(addr.rsplit(":", 1)[1])
    except ValueError:
        return None


def pod_spec(d: dict) -> dict:
    return d["spec"]["template"]["spec"]


def prestop_secs(container: dict) -> int | None:
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return None
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] in ("sleep", "/bin/sleep"):
        return int(cmd[1])
    return 0


def deployment_errors(docs: list[dict]) -> tuple[list[str], int]:
    errors: list[str] = []
    checks = 0

    def need(cond: bool, msg: str) -> None:
        nonlocal checks
        checks += 1
        if not cond:
            errors.append(msg)

    control = find(docs, "Deployment", "flex-control")
    proxy = find(docs, "Deployment", "flex-proxy")
    need(control is not None, "no Deployment flex-control")
    need(proxy is not None, "no Deployment flex-proxy")
    if control is None or proxy is None:
        return errors, checks
    services = [d for d in docs if d.get("kind") == "Service"]
    pods = {
        "flex-control": control["spec"]["template"]["metadata"]["labels"],
        "flex-proxy": proxy["spec"]["template"]["metadata"]["labels"],
    }

    for dep, cmd in ((control, "control"), (proxy, "proxy")):
        name = dep["metadata"]["name"]
        spec = pod_spec(dep)
        c = spec["containers"][0]
        need(c.get("args", [None])[0] == cmd, f"{name}: runs `flex {cmd}`")
        # The restricted Pod Security Standard.
        psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
        need(
            psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True,
            f"{name}: runAsNonRoot",
        )
        need(
            (psc.get("seccompProfile") or csc.get("seccompProfile") or {}).get("type")
            in ("RuntimeDefault", "Localhost"),
            f"{name}: seccompProfile RuntimeDefault",
        )
        need(csc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation false")
        need("ALL" in csc.get("capabilities", {}).get("drop", []), f"{name}: drops ALL capabilities")
        need(not csc.get("privileged"), f"{name}: not privileged")
        need(not spec.get("hostNetwork"), f"{name}: no hostNetwork")
        need(
            all("hostPath" not in v for v in spec.get("volumes", [])),
            f"{name}: no hostPath volume",
        )
        need(spec.get("automountServiceAccountToken") is False, f"{name}: no API token mounted")
        # Metrics: their own port, 9090 named `metrics`, and FLEX_METRICS_LISTEN on it.
        mport = port_named(c, "metrics")
        need(mport == 9090, f"{name}: container port `metrics` is 9090")
        need(
            listen_port(env_value(c, "FLEX_METRICS_LISTEN")) == mport,
            f"{name}: FLEX_METRICS_LISTEN listens on the `metrics` port",
        )
        metric_svcs = [
            s
            for s in services
            if selects({"matchLabels": s["spec"].get("selector", {})}, pods[name])
            and any(p.get("name") == "metrics" for p in s["spec"]["ports"])
        ]
        need(len(metric_svcs) == 1, f"{name}: one metrics Service selects its pods")
        for s in services:
            if not selects({"matchLabels": s["spec"].get("selector", {})}, pods[name]):
                continue
            has_metrics = any(
                p.get("targetPort") in ("metrics", mport) or p.get("port") == mport
                for p in s["spec"]["ports"]
            )
            other_ports = any(p.get("name") != "metrics" for p in s["spec"]["ports"])
            need(
                not (has_metrics and other_ports),
                f"Service {s['metadata']['name']}: metrics share a Service with the API",
            )
        # Secrets come from Secrets.
        env = env_of(c)
        for secret in ("FLEX_ADMIN_TOKEN", "FLEX_DATABASE_URL", "FLEX_NATS_PASSWORD", "FLEX_NATS_TOKEN"):
            if secret in env:
                need(
                    "secretKeyRef" in env[secret].get("valueFrom", {}),
                    f"{name}: {secret} comes from a Secret",
                )
        key_file = env_value(c, "FLEX_MASTER_KEY_FILE") or ""
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        secret_vols = {
            v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v
        }
        need(
            any(key_file.startswith(mounts[v] + "/") for v in secret_vols if v in mounts),
            f"{name}: FLEX_MASTER_KEY_FILE is in a mounted Secret",
        )
        # The control service is not open to whoever reaches it: a proxy token (in a mounted
        # Secret) or mTLS (a client CA) on both sides.
        token_file = env_value(c, "FLEX_PROXY_TOKEN_FILE") or ""
        need(
            bool(env_value(c, "FLEX_CLIENT_CA") or env_value(c, "FLEX_CONTROL_CERT"))
            or any(token_file.startswith(mounts[v] + "/") for v in secret_vols if v in mounts),
            f"{name}: FLEX_PROXY_TOKEN_FILE is in a mounted Secret (or mTLS is set up)",
        )
        # Secrets named in the render exist in it (the overlay) or are the documented ones.
        secrets = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"}
        refs = set(secret_vols.values()) | {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in env.values()
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        for r in refs:
            need(
                r in secrets or (not secrets and r in ("flex-control", "flex-master-key")),
                f"{name}: Secret {r} is rendered (or is one the base documents)",
            )

    if control is not None:
        c = pod_spec(control)["containers"][0]
        need(
            listen_port(env_value(c, "FLEX_LISTEN")) == port_named(c, "grpc"),
            "flex-control: FLEX_LISTEN on the `grpc` port",
        )
        need("FLEX_NATS_URL" in env_of(c), "flex-control: NATS (usage in, snapshots and ledger out)")

    # The proxy: probes, drain, grace.
    spec = pod_spec(proxy)
    c = spec["containers"][0]
    http = port_named(c, "http")
    need(listen_port(env_value(c, "FLEX_LISTEN")) == http, "flex-proxy: FLEX_LISTEN on the `http` port")
    rp = c.get("readinessProbe", {}).get("httpGet", {})
    lp = c.get("livenessProbe", {}).get("httpGet", {})
    need(rp.get("path") == "/readyz" and rp.get("port") in ("http", http), "flex-proxy: readiness on /readyz")
    need(lp.get("path") == "/healthz" and lp.get("port") in ("http", http), "flex-proxy: liveness on /healthz")
    pre = prestop_secs(c)
    need(pre is not None and pre > 0, "flex-proxy: a preStop hook that waits")
    drain = int(env_value(c, "FLEX_DRAIN_DELAY_SECS") or -1)
    grace = int(env_value(c, "FLEX_SHUTDOWN_GRACE_SECS") or -1)
    need(drain >= 0, "flex-proxy: FLEX_DRAIN_DELAY_SECS is set")
    need(grace >= 600, "flex-proxy: FLEX_SHUTDOWN_GRACE_SECS covers a 10-minute start_within")
    # preStop, the drain delay, the grace, then the usage log's and the snapshot's writes (5 s
    # each at most).
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    need(
        tgps >= (pre or 0) + max(drain, 0) + max(grace, 0) + 10,
        f"flex-proxy: terminationGracePeriodSeconds {tgps} covers preStop {pre} + drain {drain} "
        f"+ grace {grace} + 10 s of writes",
    )
    need(
        "FLEX_STATE_DIR" in env_of(c)
        and any(
            m["mountPath"] == env_value(c, "FLEX_STATE_DIR") for m in c.get("volumeMounts", [])
        ),
        "flex-proxy: FLEX_STATE_DIR is a volume (the usage log survives container restarts)",
    )

    # HPA and PDB.
    hpa = next((d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"), None)
    need(hpa is not None, "a HorizontalPodAutoscaler")
    if hpa:
        ref = hpa["spec"]["scaleTargetRef"]
        need(
            ref.get("kind") == "Deployment" and ref.get("name") == "flex-proxy",
            "HPA scales Deployment flex-proxy",
        )
        need(hpa["spec"].get("minReplicas", 1) >= 2, "HPA keeps at least 2 proxies")
        need(
            all("requests" in x.get("resources", {}) for x in spec["containers"]),
            "flex-proxy: resource requests (the HPA's utilization needs them)",
        )
    pdb = next((d for d in docs if d.get("kind") == "PodDisruptionBudget"), None)
    need(pdb is not None, "a PodDisruptionBudget")
    if pdb:
        need(selects(pdb["spec"]["selector"], pods["flex-proxy"]), "PDB selects the proxies")
        need(
            pdb["spec"].get("maxUnavailable", 0) not in (0, "0", "0%")
            or "minAvailable" in pdb["spec"],
            "PDB lets a drain proceed",
        )

    # ServiceMonitor: selects the metrics Services, scrapes the `metrics` port.
    sm = next((d for d in docs if d.get("kind") == "ServiceMonitor"), None)
    need(sm is not None, "a ServiceMonitor")
    if sm:
        selected = [
            s["metadata"]["name"]
            for s in services
            if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        need(
            sorted(selected) == ["flex-control-metrics", "flex-proxy-metrics"],
            f"ServiceMonitor selects the two metrics Services (it selects {selected})",
        )
        need(
            [e.get("port") for e in sm["spec"]["endpoints"]] == ["metrics"],
            "ServiceMonitor scrapes the port named metrics",
        )

    # NetworkPolicy of the proxies.
    np = find(docs, "NetworkPolicy", "flex-proxy")
    need(np is not None, "a NetworkPolicy for the proxies")
    if np:
        need(selects(np["spec"]["podSelector"], pods["flex-proxy"]), "the NetworkPolicy selects the proxies")
        need("Egress" in np["spec"].get("policyTypes", []), "the NetworkPolicy restricts egress")
        rules = np["spec"].get("egress", [])
        need(all(r.get("to") for r in rules), "every egress rule names its destinations")
        need(all(r.get("ports") for r in rules), "every egress rule names its ports")

        def allowed(labels: dict | None, port: int) -> bool:
            for r in rules:
                ports = {p.get("port") for p in r.get("ports", [])}
                for t in r.get("to", []):
                    if labels is not None and "podSelector" in t and "namespaceSelector" not in t:
                        if selects(t["podSelector"], labels) and port in ports:
                            return True
            return False

        need(allowed(pods["flex-control"], 50051), "proxies reach the control plane on 50051")
        need(allowed({"app.kubernetes.io/name": "nats"}, 4222), "proxies reach NATS on 4222")
        need(allowed({"app.kubernetes.io/name": "redis"}, 6379), "proxies reach Redis on 6379")
        need(
            any(
                53 in {p.get("port") for p in r.get("ports", [])}
                and any("namespaceSelector" in t for t in r.get("to", []))
                for r in rules
            ),
            "proxies reach the cluster DNS",
        )
        internet = [
            (t["ipBlock"], {p.get("port") for p in r.get("ports", [])})
            for r in rules
            for t in r.get("to", [])
            if "ipBlock" in t
        ]
        need(
            any(b["cidr"] == "0.0.0.0/0" and ports == {443} for b, ports in internet),
            "proxies reach the providers: HTTPS (443 only) to the internet",
        )
        need(
            all(
                {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}
                <= set(b.get("except", []))
                for b, _ in internet
                if b["cidr"] == "0.0.0.0/0"
            ),
            "the internet rule leaves out the private ranges and the metadata endpoint",
        )
    return errors, checks


# ----- the binary -----------------------------------------------------------------------------


def help_vars(flex: str, cmd: str) -> set[str]:
    out = subprocess.run([flex, cmd, "--help"], capture_output=True, text=True, check=True).stdout
    names = set(re.findall(r"\[env: (FLEX_[A-Z0-9_]+)", out))
    if not names:
        raise SystemExit(f"`{flex} {cmd} --help` lists no env vars")
    return names


def free_addr() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def binary_errors(docs: list[dict], flex: str, tmp: Path) -> tuple[list[str], int]:
    errors: list[str] = []
    checks = 0
    key = tmp / "master.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    for dep in (d for d in docs if d.get("kind") == "Deployment"):
        for c in pod_spec(dep)["containers"]:
            cmd = c["args"][0]
            known = help_vars(flex, cmd)
            env: dict[str, str] = {}
            for name, e in env_of(c).items():
                if not name.startswith("FLEX_"):
                    continue
                checks += 1
                if name in NOT_A_FLAG:
                    pass
                elif name in known and (cmd, name) in PENDING:
                    errors.append(f"{name} is now read by `flex {cmd}`: remove it from PENDING in validate.py")
                elif name not in known and (cmd, name) not in PENDING:
                    errors.append(f"{dep['metadata']['name']}: {name} is not read by `flex {cmd}` (see `flex {cmd} --help`)")
                value = e.get("value")
                if value is None:
                    value = {"FLEX_DATABASE_URL": "postgres://flex@127.0.0.1:9/flex"}.get(name, "x")
                # Only addresses and files are replaced, as tests/deploy.rs does.
                if name in ("FLEX_LISTEN", "FLEX_METRICS_LISTEN"):
                    value = free_addr()
                elif name == "FLEX_MASTER_KEY_FILE":
                    value = str(key)
                elif name == "FLEX_STATE_DIR":
                    value = str(tmp / f"state-{dep['metadata']['name']}")
                elif name in ("FLEX_CONTROL_URL",):
                    value = "http://127.0.0.1:9"
                elif name == "FLEX_NATS_URL":
                    value = "nats://127.0.0.1:9"
                env[name] = value
            checks += 1
            proc = subprocess.Popen(
                [flex, *c["args"]],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                _, stderr = proc.communicate(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
            clap = any(m in stderr for m in ("invalid value", "unexpected argument", "required arguments"))
            if proc.returncode == 2 or clap:
                errors.append(f"{dep['metadata']['name']}: `flex {' '.join(c['args'])}` refuses its environment:\n{stderr}")
    return errors, checks


# ----- the dashboard --------------------------------------------------------------------------


def load_metrics(path: Path) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or parts[1] not in ("counter", "gauge", "histogram"):
            raise SystemExit(f"{path}: `{line}`: expected NAME TYPE [LABEL,LABEL…]")
        out[parts[0]] = (parts[1], set(parts[2].split(",")) if len(parts) == 3 else set())
    return out


def grafana_vars(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$__interval", "1m")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def walk(node, out: list) -> None:
    p = promql_parser
    if isinstance(node, p.VectorSelector):
        out.append(("selector", node))
    elif isinstance(node, p.MatrixSelector):
        walk(node.vector_selector, out)
    elif isinstance(node, p.AggregateExpr):
        if node.modifier is not None:
            out.append(("labels", list(node.modifier.labels)))
        walk(node.expr, out)
        if node.param is not None:
            walk(node.param, out)
    elif isinstance(node, p.BinaryExpr):
        m = node.modifier
        if m is not None and m.matching is not None:
            out.append(("labels", list(m.matching.labels)))
        walk(node.lhs, out)
        walk(node.rhs, out)
    elif isinstance(node, p.Call):
        for a in node.args:
            walk(a, out)
    elif isinstance(node, (p.ParenExpr, p.UnaryExpr, p.SubqueryExpr)):
        walk(node.expr, out)


def query_errors(expr: str, metrics: dict, used: set, where: str) -> list[str]:
    try:
        ast = promql_parser.parse(grafana_vars(expr))
    except Exception as e:  # the parser's own error type
        return [f"{where}: not PromQL ({e}): {expr}"]
    found: list = []
    walk(ast, found)
    errors = []
    series_labels: set[str] = set()
    selectors = [n for k, n in found if k == "selector"]
    if not selectors:
        errors.append(f"{where}: reads no series: {expr}")
    for sel in selectors:
        name = sel.name
        base, suffix = name, ""
        for s in ("_bucket", "_sum", "_count"):
            if name.endswith(s) and name[: -len(s)] in metrics:
                base, suffix = name[: -len(s)], s
        if base not in metrics:
            errors.append(f"{where}: {name} is not in metrics.txt")
            continue
        kind, labels = metrics[base]
        if kind == "histogram" and not suffix:
            errors.append(f"{where}: histogram {base} read without _bucket/_sum/_count")
        if kind != "histogram" and suffix:
            errors.append(f"{where}: {name}: {base} is a {kind}")
        used.add(base)
        allowed = labels | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        series_labels |= allowed
        for m in sel.matchers.matchers:
            if m.name not in allowed:
                errors.append(f"{where}: {base} has no label `{m.name}`")
    for k, labels in found:
        if k == "labels":
            for label in labels:
                if label not in series_labels:
                    errors.append(f"{where}: groups by `{label}`, a label none of its series has")
    return errors


def dashboard_errors(dash_path: Path, metrics_path: Path) -> tuple[list[str], int]:
    errors: list[str] = []
    checks = 0
    try:
        dash = json.loads(dash_path.read_text())
    except json.JSONDecodeError as e:
        return [f"{dash_path}: not JSON: {e}"], 1
    metrics = load_metrics(metrics_path)
    used: set[str] = set()
    ds_var = "${datasource}"
    templ = dash.get("templating", {}).get("list", [])
    checks += 1
    if not any(v.get("type") == "datasource" and v.get("name") == "datasource" for v in templ):
        errors.append("no `datasource` variable (the dashboard must work with any Prometheus)")
    for v in templ:
        if v.get("type") == "query":
            checks += 1
            q = v.get("query", {})
            q = q.get("query", "") if isinstance(q, dict) else q
            m = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)", q.strip())
            if not m:
                errors.append(f"variable {v.get('name')}: unexpected query {q}")
                continue
            errors += query_errors(m.group(1), metrics, used, f"variable {v.get('name')}")
            base = re.match(r"[a-z_:][a-z0-9_:]*", m.group(1))
            if base and base.group(0) in metrics and m.group(2) not in metrics[base.group(0)][1]:
                errors.append(f"variable {v.get('name')}: {base.group(0)} has no label {m.group(2)}")
    ids = set()
    panels = list(dash.get("panels", []))
    for p in panels:
        panels.extend(p.get("panels", []))
    for p in panels:
        checks += 1
        pid = p.get("id")
        if pid in ids:
            errors.append(f"panel id {pid} is used twice")
        ids.add(pid)
        g = p.get("gridPos", {})
        if g.get("x", 0) + g.get("w", 0) > 24:
            errors.append(f"panel {p.get('title')}: wider than the grid")
        if p.get("type") == "row":
            continue
        if p.get("datasource", {}).get("uid") != ds_var:
            errors.append(f"panel {p.get('title')}: datasource is not {ds_var}")
        targets = p.get("targets", [])
        if not targets:
            errors.append(f"panel {p.get('title')}: no query")
        for t in targets:
            checks += 1
            if t.get("datasource", {}).get("uid") != ds_var:
                errors.append(f"panel {p.get('title')} {t.get('refId')}: datasource is not {ds_var}")
            errors += query_errors(t.get("expr", ""), metrics, used, f"panel {p.get('title')!r}")
    checks += 1
    unused = sorted(set(metrics) - used)
    if unused:
        errors.append(f"metrics.txt names series the dashboard does not use: {unused}")
    return errors, checks


# ----- breaking copies on purpose -------------------------------------------------------------


def self_test(docs: list[dict], dash_path: Path, metrics_path: Path, flex: str, tmp: Path) -> list[str]:
    misses = []

    def proxy_container(d: list[dict]) -> dict:
        return pod_spec(find(d, "Deployment", "flex-proxy"))["containers"][0]

    def broken(name: str, mutate, check) -> None:
        d = copy.deepcopy(docs)
        mutate(d)
        if not check(d):
            misses.append(f"a copy with {name} passed")

    sem = lambda d: deployment_errors(d)[0]  # noqa: E731
    broken("no preStop", lambda d: proxy_container(d).pop("lifecycle"), sem)
    broken(
        "a 60 s termination grace",
        lambda d: pod_spec(find(d, "Deployment", "flex-proxy")).update(terminationGracePeriodSeconds=60),
        sem,
    )
    broken(
        "readiness on /healthz",
        lambda d: proxy_container(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
        sem,
    )
    broken(
        "an egress rule open to everything",
        lambda d: find(d, "NetworkPolicy", "flex-proxy")["spec"]["egress"].append({}),
        sem,
    )
    broken(
        "a containerPort as text",
        lambda d: proxy_container(d)["ports"][0].update(containerPort="eighty"),
        schema_errors,
    )
    broken(
        "an unknown field",
        lambda d: proxy_container(d).update(restartPolicyy="Always"),
        schema_errors,
    )
    broken(
        "an unknown ServiceMonitor field",
        lambda d: next(x for x in d if x["kind"] == "ServiceMonitor")["spec"]["endpoints"][0].update(
            intervall="15s"
        ),
        schema_errors,
    )
    broken(
        "an unknown FLEX_ variable",
        lambda d: proxy_container(d)["env"].append({"name": "FLEX_NO_SUCH_FLAG", "value": "1"}),
        lambda d: binary_errors(d, flex, tmp)[0],
    )
    broken(
        "a value the parser refuses",
        lambda d: next(e for e in proxy_container(d)["env"] if e["name"] == "FLEX_SHUTDOWN_GRACE_SECS").update(
            value="eleven minutes"
        ),
        lambda d: binary_errors(d, flex, tmp)[0],
    )
    dash = json.loads(dash_path.read_text())
    for name, expr in (
        ("an unknown series", "rate(flex_no_such_total[5m])"),
        ("an unknown label", 'rate(flex_requests_total{colour="red"}[5m])'),
        ("a histogram read bare", "flex_overhead_seconds"),
        ("broken PromQL", "sum(rate(flex_requests_total[5m])"),
    ):
        d = copy.deepcopy(dash)
        d["panels"][1]["targets"][0]["expr"] = expr
        p = tmp / "broken-dashboard.json"
        p.write_text(json.dumps(d))
        if not dashboard_errors(p, metrics_path)[0]:
            misses.append(f"a dashboard with {name} passed")
    return misses


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flex", required=True, help="the flex binary (target/debug/flex)")
    ap.add_argument("--dashboard", required=True, type=Path)
    ap.add_argument("--metrics", required=True, type=Path)
    ap.add_argument("rendered", nargs="+", type=Path)
    args = ap.parse_args()
    report = Report()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for path in args.rendered:
            docs = load(path)
            kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
            print(f"{path}: {len(docs)} resources: {', '.join(kinds)}")
            report.group(f"{path.name}: schemas ({', '.join(K8S_VERSIONS)}, strict)", schema_errors(docs), len(docs) * len(K8S_VERSIONS))
            errs, n = deployment_errors(docs)
            report.group(f"{path.name}: probes, drain, metrics, HPA, PDB, NetworkPolicy, secrets, pod security", errs, n)
            errs, n = binary_errors(docs, args.flex, tmp)
            report.group(f"{path.name}: FLEX_* variables against `flex --help` and its parser", errs, n)
        errs, n = dashboard_errors(args.dashboard, args.metrics)
        report.group(f"{args.dashboard.name}: JSON, PromQL, series and labels of {args.metrics.name}", errs, n)
        misses = self_test(load(args.rendered[-1]), args.dashboard, args.metrics, args.flex, tmp)
        report.group("broken copies are caught", misses, 13)
    print(f"({time.monotonic() - t0:.1f} s)")
    print(f"deploy: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
