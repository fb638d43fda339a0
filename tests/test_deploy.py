"""deploy/kubernetes/ and the Dockerfile: valid for Kubernetes, and consistent with the CLI.

Every manifest is checked against the Kubernetes API schemas (the
``kubernetes-validate`` package, strict: unknown fields are errors); every
``revdial`` container's arguments must parse with revdial's own command line,
and every file they name must be on a mounted volume. The image itself is not
built here (no container engine on the test machines).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from revdial._cli import _build_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}#{i}-{doc['kind']}", doc))
    return out


DOCS = documents()


def test_the_manifests_are_there() -> None:
    assert {p.name for p in MANIFESTS} >= {"server.yaml", "agent.yaml"}
    kinds = {doc["kind"] for _, doc in DOCS}
    assert kinds >= {"Deployment", "Service", "ServiceAccount", "ClusterRoleBinding"}


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=[n for n, _ in DOCS])
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _revdial_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for name, doc in DOCS:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            if container["image"].startswith("revdial"):
                found.append((f"{name}/{container['name']}", pod, container))
    return found


CONTAINERS = _revdial_containers()


@pytest.mark.parametrize(("name", "pod", "container"), CONTAINERS,
                         ids=[n for n, _, _ in CONTAINERS])
def test_container_arguments_are_revdial_commands(
    name: str, pod: dict[str, Any], container: dict[str, Any]
) -> None:
    args = [str(a) for a in container["args"]]
    parsed = _build_parser().parse_args(args)  # exits (fails the test) if not valid
    assert parsed.command in ("server", "agent"), shlex.join(args)
    # Secrets come from the environment (REVDIAL_TOKEN), never the command line.
    assert "--token" not in args
    assert any(e["name"] == "REVDIAL_TOKEN" for e in container.get("env", []))
    # Every file an argument names is on a mounted volume (or the service account's).
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    if pod.get("serviceAccountName") and pod.get("automountServiceAccountToken", True):
        mounts.append(SA_DIR)
    for value in args:
        if value.startswith("/"):
            assert any(value.startswith(m.rstrip("/") + "/") for m in mounts), (value, mounts)
    # The probes use the server's monitoring listener.
    if parsed.command == "server":
        assert parsed.metrics_listen is not None
        port = parsed.metrics_listen[1]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            assert container[probe]["httpGet"]["path"] == path
            assert named[container[probe]["httpGet"]["port"]] == port


def test_dockerfile_installs_the_package_and_runs_revdial() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "COPY pyproject.toml" in text
    assert "COPY src ./src" in text
    assert 'ENTRYPOINT ["revdial"]' in text
    assert "USER 65532" in text


def _server_container() -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = [doc for _, doc in DOCS
                     if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "revdial-server"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_the_server_runs_three_peered_replicas() -> None:
    deployment, container = _server_container()
    assert deployment["spec"]["replicas"] == 3
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    parsed = _build_parser().parse_args([str(a) for a in container["args"]])
    assert parsed.peer_id == "$(POD_IP):8123"
    assert "--peer-token" not in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    peer_secret = env["REVDIAL_PEER_TOKEN"]["valueFrom"]["secretKeyRef"]
    agent_secret = env["REVDIAL_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert peer_secret["key"] != agent_secret["key"]  # peer and agent tokens differ
    # --peers-dns names the headless Service, in the Deployment's namespace, on the
    # port the agents use (peers connect where agents do).
    name, port = parsed.peers_dns
    services = {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == "Service"}
    service_name, namespace = name.split(".")[:2]
    headless = services[service_name]
    assert namespace == headless["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= labels.items()
    assert port == parsed.listen[1]
    assert any(p["port"] == port for p in headless["spec"]["ports"])
    # A disruption budget keeps a majority of the replicas up.
    (pdb,) = [doc for _, doc in DOCS if doc["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def _rules_of(role_name: str) -> list[dict[str, Any]]:
    (role,) = [doc for _, doc in DOCS
               if doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == role_name]
    return list(role["rules"])


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               for r in rules)


def test_the_agent_may_impersonate_and_ask_the_cluster_about_kubectl_as() -> None:
    """The front door's identities (Impersonate-*) and its ``kubectl --as``
    checks (SubjectAccessReviews) need these rights of the agent's account."""
    (binding,) = [doc for _, doc in DOCS if doc["kind"] == "ClusterRoleBinding"
                  and doc["metadata"]["name"] == "revdial-agent-impersonate"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "revdial-agent", "namespace": "revdial"}]
    rules = _rules_of(binding["roleRef"]["name"])
    for group, resource in (("", "users"), ("", "groups"), ("", "serviceaccounts"),
                            ("authentication.k8s.io", "uids"),
                            ("authentication.k8s.io", "userextras")):
        assert _allows(rules, group, resource, "impersonate"), resource
    assert _allows(rules, "authorization.k8s.io", "subjectaccessreviews", "create")
    assert not _allows(rules, "", "pods", "create")  # nothing beyond that
