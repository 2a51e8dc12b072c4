"""Checks the Kubernetes manifests in a deploy folder, offline: every resource its
kustomization.yaml lists validates (strictly: no unknown field) against the Kubernetes schema
that kubernetes-validate ships for the given version, and the DaemonSet gives the node what
its config file (the ConfigMap's) points at: the config file itself, the cluster CA and CRL,
the node's own certificate and key, and its data dir, each under a mounted volume.

Usage: validate_manifests.py DEPLOY_DIR KUBERNETES_VERSION. Prints one line per resource;
exits non-zero on the first problem, naming it.
"""

import os
import sys
import tomllib

import kubernetes_validate
import yaml


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def main():
    deploy, version = sys.argv[1], sys.argv[2]
    with open(os.path.join(deploy, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    resources = {}
    for name in kustomization["resources"]:
        with open(os.path.join(deploy, name)) as f:
            for document in yaml.safe_load_all(f):
                try:
                    kubernetes_validate.validate(document, version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    fail(f"{name}: {document['kind']}: {error.path}: {error.message}")
                if document["metadata"].get("namespace", kustomization["namespace"]) != kustomization["namespace"]:
                    fail(f"{name}: {document['kind']} is outside namespace {kustomization['namespace']}")
                resources[document["kind"]] = document
                print(f"{name}: {document['kind']} {document['metadata']['name']} valid for Kubernetes {version}")

    generated = kustomization["configMapGenerator"][0]
    config_file = generated["files"][0]
    with open(os.path.join(deploy, config_file), "rb") as f:
        config = tomllib.load(f)

    pod = resources["DaemonSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}

    def volume_of(path, what):
        for mount_path, volume in mounts.items():
            if path.startswith(mount_path.rstrip("/") + "/"):
                return volume
        fail(f"{what} {path} is on no volume the DaemonSet mounts")

    args = container["args"]
    config_path = args[args.index("--config") + 1]
    if volume_of(config_path, "the config file").get("configMap", {}).get("name") != generated["name"]:
        fail(f"the config file {config_path} is not the ConfigMap {generated['name']}")
    cluster = config["cluster"]
    secret = volume_of(cluster["ca"], "cluster.ca").get("secret")
    if not secret or volume_of(cluster["crl"], "cluster.crl").get("secret") != secret:
        fail("cluster.ca and cluster.crl are not from the cluster's Secret")
    for key in ("cert", "key"):
        if "hostPath" not in volume_of(cluster[key], f"cluster.{key}"):
            fail(f"cluster.{key} is not kept on the node (hostPath)")
    if "hostPath" not in volume_of(config["data_dir"], "data_dir"):
        fail("data_dir is not kept on the node (hostPath)")

    service = resources["Service"]["spec"]
    port = int(cluster["listen"].rsplit(":", 1)[1])
    seed = f"dns:{resources['Service']['metadata']['name']}.{kustomization['namespace']}.svc.cluster.local:{port}"
    if cluster["seeds"] != [seed]:
        fail(f"cluster.seeds is {cluster['seeds']}, not the headless Service {seed}")
    if service.get("clusterIP") != "None" or [p["port"] for p in service["ports"]] != [port]:
        fail("the seeds' Service is not headless on the node port")
    if not service["selector"].items() <= pod_labels(resources).items():
        fail("the seeds' Service does not select the DaemonSet's pods")
    env = {variable["name"]: variable for variable in container["env"]}
    for name in ("TENSORLET_NODE_ID", "TENSORLET_ADVERTISE"):
        if name not in env:
            fail(f"the DaemonSet does not set {name}")
    if not env["TENSORLET_ADVERTISE"]["value"].endswith(f":{port}"):
        fail("TENSORLET_ADVERTISE is not the node port")
    print(f"the DaemonSet mounts everything {config_file} names")


def pod_labels(resources):
    return resources["DaemonSet"]["spec"]["template"]["metadata"]["labels"]


if __name__ == "__main__":
    main()
