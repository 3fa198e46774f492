"""Bundle → Kubernetes manifests: replicas of ``lensforge serve`` behind a Service, or a KServe predictor.

    <out>/deployment.yaml        Deployment: ``lensforge serve /models/bundle --host 0.0.0.0 --port 8080 ...``
    <out>/service.yaml           Service (ClusterIP, port 8080 → the container's ``http`` port)
    <out>/poddisruptionbudget.yaml  at most one replica down during voluntary disruptions (node drains)
    <out>/kserve/inferenceservice.yaml  the same container as a KServe custom predictor (v2 protocol)
    <out>/autoscaling/hpa.yaml   HorizontalPodAutoscaler on ``lensforge_queue_depth`` (needs a custom-metrics adapter)
    <out>/autoscaling/prometheus-adapter-values.yaml  the adapter rule that exposes that metric
    <out>/README.md              how to fill the bundle volume, apply, and scale

``kubectl apply -f <out>`` applies only the top level (kubectl does not recurse without ``-R``):
the plain Deployment, Service and PodDisruptionBudget. The InferenceService is the alternative to
them (apply one or the other) and the HPA needs the adapter first, so both sit in subfolders.

The bundle is mounted read-only from a PersistentVolumeClaim named ``<name>-bundle`` (the other
way, an image with the bundle baked in, is described in the generated README).

Memory comes from the bundle, not a guess (see :func:`memory_budget`): measured on this project's
bundles, a loaded and warmed-up model costs 4.3-5.7x its ``model.onnx`` size (EfficientNet-Lite0
64 px: 12.8 MB file → 56-62 MB; the detector: 27.3 MB → 156 MB) on top of ~86 MB for the
server process with nothing loaded.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from lensforge.data.image import DEFAULT_MAX_PIXELS
from lensforge.errors import BundleError, ExportError
from lensforge.export._serving import model_name
from lensforge.runtime.bundle import Bundle, as_bundle, atomic_directory

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "lensforge-serve:latest"  # what `docker build -t lensforge-serve .` (compose.yaml) names the repo's Dockerfile
PORT = 8080  # KServe's custom-container convention; the Dockerfile's own default (8000) is overridden by --port
BUNDLE_MOUNT = "/models/bundle"  # where the Dockerfile and compose.yaml expect the bundle
USER_ID = 10001  # the Dockerfile's `lensforge` user

# Shutdown: Kubernetes removes a terminating pod from the Service's endpoints asynchronously
# (kube-proxy / ingress controllers take a few seconds to notice), so the server keeps answering
# (readiness 503, new requests 503 + Retry-After) for DRAIN_S before it closes the port, then
# gives accepted requests GRACE_S. The kubelet SIGKILLs at terminationGracePeriodSeconds, so
# that must be longer: GRACE_MARGIN_S covers interpreter exit and signal delivery delays.
DRAIN_S = 5
GRACE_S = 30
GRACE_MARGIN_S = 10

# Memory (MiB). BASE: RSS of `lensforge serve` with its imports and no model (86 MB measured,
# rounded up). MODEL_FACTOR x model.onnx size: weights, the optimised graph and onnxruntime's
# activation arena after batches of 16 (measured 4.3-5.7x, see the module docstring).
BASE_MIB = 100
MODEL_FACTOR = 6
# The decoded-image budget: the server decodes in a pool of min(4, cores) threads
# (serve/server.py), each image capped at DEFAULT_MAX_PIXELS by the decoder; a decode can hold two
# full-size RGBA-sized copies at once (the decoded frame and its RGB / EXIF-rotated copy).
DECODE_THREADS = 4
DECODE_BYTES_PER_PIXEL = 4 * 2
MAX_QUEUE = 64  # `lensforge serve --max-queue` default: prepared inputs that may wait per model
MIB = 1024 * 1024

QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
UNITS = {None: 1, "Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "Ti": 1024 ** 2 * MIB,
         "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4}


def export_kserve(
    bundle: str | os.PathLike[str] | Bundle,
    out: Path,
    *,
    name: str | None = None,
    image: str = DEFAULT_IMAGE,
    memory: str | None = None,
    cpus: int = 2,
    replicas: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write the manifests for ``bundle`` to ``out`` (see the module docstring); return ``out``.

    name: the served model name (``/v2/models/<name>``; default: the bundle's run directory);
        Kubernetes objects get a DNS-safe form of it. image: the serving image the repo's
        Dockerfile builds, as your cluster pulls it. memory: a Kubernetes quantity (``2Gi``) for
        both request and limit instead of the estimate. cpus: CPU request = limit, and
        ``--threads`` for onnxruntime. replicas: Deployment replicas, PDB and HPA minimum.

    Every manifest is checked against the Kubernetes OpenAPI models (:func:`validate`).
    """
    b = as_bundle(bundle)
    served = model_name(b, name)
    if cpus < 1 or replicas < 1:
        raise ExportError(f"need cpus >= 1 and replicas >= 1, got {cpus} and {replicas}")
    if not image or any(c.isspace() for c in image):
        raise ExportError(f"invalid container image {image!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    budget = memory_budget(b)
    if memory is not None:
        request = parse_quantity(memory)
        if request < budget["loaded_mib"] * MIB:
            raise ExportError(f"--memory {memory} is below the {budget['loaded_mib']} MiB the server needs to load "
                              f"{b.model_path.name}; the pod would be OOM-killed at start")
        mem_request = mem_limit = memory
    else:
        mem_request, mem_limit = f"{budget['request_mib']}Mi", f"{budget['limit_mib']}Mi"
    manifests = build_manifests(b, served, image=image, mem_request=mem_request, mem_limit=mem_limit,
                                cpus=cpus, replicas=replicas)
    for doc in manifests.values():
        validate(doc)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            for rel, doc in manifests.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text(dump(doc))
            (tmp / "autoscaling" / "prometheus-adapter-values.yaml").write_text(adapter_values())
            (tmp / "README.md").write_text(readme(served, k8s_name(served), budget, mem_request, mem_limit, image))
    except BundleError as e:  # a race: ``out`` appeared after the check above
        raise ExportError(str(e)) from None
    log.info("wrote Kubernetes / KServe manifests for %r to %s", served, out)
    return out


class _NoAliases(yaml.SafeDumper):
    """Repeat shared label dicts in full: ``&id001`` anchors are valid YAML but unreadable in a manifest."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_NoAliases, sort_keys=False)


def memory_budget(bundle: Bundle) -> dict[str, int]:
    """Memory request and limit in MiB, from the bundle's model size and input size.

    loaded = BASE + MODEL_FACTOR x model.onnx size (what a warmed-up, idle server holds);
    request = loaded + the queue of prepared inputs (MAX_QUEUE float32 3 x S x S tensors, twice:
    queued and copied into a batch); limit = request + the decoded-image budget (DECODE_THREADS
    images of DEFAULT_MAX_PIXELS at DECODE_BYTES_PER_PIXEL). The limit bounds a burst of
    worst-case uploads; the request is what the scheduler reserves for steady load.
    """
    try:
        model_bytes = bundle.model_path.stat().st_size
    except OSError as e:
        raise BundleError(f"{bundle.model_path} cannot be read: {e.strerror}") from None
    if bundle.task == "detect":
        side = bundle.detect_spec.max_size  # one image per model call, at most max_size on its longer side
        queue_bytes = MAX_QUEUE * 3 * side * side * 4
    else:
        side = bundle.input_spec.size
        queue_bytes = 2 * MAX_QUEUE * 3 * side * side * 4
    loaded = BASE_MIB + -(-MODEL_FACTOR * model_bytes // MIB)
    request = loaded + -(-queue_bytes // MIB)
    decode = -(-DECODE_THREADS * DEFAULT_MAX_PIXELS * DECODE_BYTES_PER_PIXEL // MIB)
    return {"model_mib": -(-model_bytes // MIB), "loaded_mib": loaded, "queue_mib": request - loaded,
            "decode_mib": decode, "request_mib": request, "limit_mib": request + decode}


def parse_quantity(text: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``2Gi``, ``1.5G``, ``1048576``) in bytes."""
    m = QUANTITY.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ExportError(f"invalid memory quantity {text!r}: use a Kubernetes quantity such as 512Mi or 2Gi")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def k8s_name(served: str) -> str:
    """A DNS-1035 label (Service and InferenceService names): lowercase letters, digits and '-',
    starting with a letter, short enough for the ``-bundle`` / ``-predictor`` suffixes."""
    s = re.sub(r"[^a-z0-9-]+", "-", served.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = f"lf-{s}".rstrip("-")
    return s[:40].rstrip("-")


def serve_args(served: str, cpus: int) -> list[str]:
    """The ``lensforge serve`` command line in the container (tests parse it with the real CLI)."""
    return ["lensforge", "serve", BUNDLE_MOUNT, "--host", "0.0.0.0", "--port", str(PORT), "--name", served,
            "--threads", str(cpus), "--drain", str(DRAIN_S), "--grace", str(GRACE_S)]


def pod_spec(served: str, *, image: str, mem_request: str, mem_limit: str, cpus: int, claim: str) -> dict[str, Any]:
    """The pod both the Deployment and the InferenceService run."""
    probe = {"port": "http", "scheme": "HTTP"}
    container = {
        "name": "kserve-container",  # the name KServe requires for a custom predictor; harmless elsewhere
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": serve_args(served, cpus)[:1],
        "args": serve_args(served, cpus)[1:],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # the model loads after the port opens: /healthz answers at once, /readyz once it is warm
        "startupProbe": {"httpGet": {"path": "/healthz", **probe}, "periodSeconds": 2, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe}, "periodSeconds": 10, "timeoutSeconds": 3,
                          "failureThreshold": 3},
        # 503 while loading and from the moment SIGTERM arrives: taken out of the Service at once
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe}, "periodSeconds": 2, "timeoutSeconds": 2,
                           "failureThreshold": 1},
        "resources": {"requests": {"cpu": str(cpus), "memory": mem_request},
                      "limits": {"cpu": str(cpus), "memory": mem_limit}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "bundle", "mountPath": BUNDLE_MOUNT, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "terminationGracePeriodSeconds": DRAIN_S + GRACE_S + GRACE_MARGIN_S,
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,  # the server never talks to the API server
        "containers": [container],
        "volumes": [{"name": "bundle", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }


def build_manifests(bundle: Bundle, served: str, *, image: str, mem_request: str, mem_limit: str,
                    cpus: int, replicas: int) -> dict[str, dict[str, Any]]:
    """Relative path → manifest (a dict in the Kubernetes API's JSON shape)."""
    name = k8s_name(served)
    labels = {"app.kubernetes.io/name": "lensforge", "app.kubernetes.io/instance": name}
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}
    pod = pod_spec(served, image=image, mem_request=mem_request, mem_limit=mem_limit, cpus=cpus,
                   claim=f"{name}-bundle")
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            # one new pod ready before an old one goes: capacity never drops during a rollout
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels, "annotations": scrape}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"type": "ClusterIP", "selector": labels,
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    pdb = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "labels": labels},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }
    # A queue waiting for the model is the direct signal that a replica is saturated (CPU is
    # not: a batching server idles its cores between batches). Target: one full batch
    # (--max-batch 16) waiting per pod on average.
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas, "maxReplicas": max(10, replicas),
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "lensforge_queue_depth"},
                                                   "target": {"type": "AverageValue", "averageValue": "16"}}}],
            # scale down slowly: a queue that empties between bursts must not shed replicas at once
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }
    isvc_pod = {k: v for k, v in pod.items()}
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": name, "labels": labels,
                     # RawDeployment: a plain Deployment under KServe (Knative would refuse
                     # terminationGracePeriodSeconds and PVC volumes without feature flags)
                     "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment", **scrape}},
        "spec": {"predictor": {"minReplicas": replicas, "maxReplicas": max(10, replicas), **isvc_pod}},
    }
    return {"deployment.yaml": deployment, "service.yaml": service, "poddisruptionbudget.yaml": pdb,
            "kserve/inferenceservice.yaml": isvc, "autoscaling/hpa.yaml": hpa}


# KServe's ComponentExtensionSpec: the predictor's fields that are not PodSpec fields
KSERVE_COMPONENT_FIELDS = frozenset({
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
    "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy",
})
MODEL_TYPES = {
    ("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}


def validate(doc: dict[str, Any]) -> None:
    """Check ``doc`` against the ``kubernetes`` client's OpenAPI models; raise :class:`ExportError`.

    The client's deserialiser drops fields it does not know and coerces types, so a model is
    built (required fields and enums are checked by its setters) and serialised back: anything
    not identical to ``doc`` (a misspelt field, a string where an integer belongs) is reported.
    An InferenceService (a CRD, no model in the client) is checked as its metadata plus its
    predictor's PodSpec, the part Kubernetes runs.
    """
    try:
        from kubernetes.client import ApiClient
    except ImportError:
        raise ExportError("the kubernetes package is needed to check the manifests: pip install 'lensforge[export]'") from None
    api = ApiClient()
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key == ("serving.kserve.io/v1beta1", "InferenceService"):
        predictor = doc.get("spec", {}).get("predictor", {})
        parts = [(doc.get("metadata", {}), "V1ObjectMeta", "metadata"),
                 ({k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}, "V1PodSpec",
                  "spec.predictor")]
    elif key in MODEL_TYPES:
        parts = [(doc, MODEL_TYPES[key], "")]
    else:
        raise ExportError(f"no Kubernetes model to check {key[1]} {key[0]} against")
    for data, type_name, where in parts:
        try:
            model = api._ApiClient__deserialize(data, type_name)  # the client's own (private) deserialiser
        except (ValueError, TypeError) as e:
            raise ExportError(f"generated {key[1]} {where} is not a valid {type_name}: {e}") from None
        back = api.sanitize_for_serialization(model)
        if back != data:
            raise ExportError(f"generated {key[1]} {where} does not round-trip through {type_name}: "
                              f"{_first_difference(data, back)}")


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in b:
                return f"{path}.{k} is not a field of the model"
            if k not in a:
                return f"{path}.{k} was added"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or 'document'}: {a!r} became {b!r}"


def adapter_values() -> str:
    """Helm values for prometheus-community/prometheus-adapter exposing the queue depth per pod."""
    return """\
# helm install prometheus-adapter prometheus-community/prometheus-adapter -f prometheus-adapter-values.yaml
# (set prometheus.url / prometheus.port to your Prometheus). Exposes lensforge_queue_depth, summed
# over the models a pod serves, to the custom.metrics.k8s.io API that autoscaling/hpa.yaml reads.
rules:
  default: false
  custom:
    - seriesQuery: 'lensforge_queue_depth{namespace!="",pod!=""}'
      resources:
        overrides:
          namespace: {resource: "namespace"}
          pod: {resource: "pod"}
      name:
        matches: "^lensforge_queue_depth$"
        as: "lensforge_queue_depth"
      metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
"""


def readme(served: str, name: str, budget: dict[str, int], mem_request: str, mem_limit: str, image: str) -> str:
    return f"""# Serving `{served}` on Kubernetes

Written by `lensforge export --to kserve`. Container image: `{image}` (build it from the
repository's Dockerfile: `docker build -t {image} .`, push it where your cluster pulls from, and
pass `--image` to use another name).

## 1. Put the bundle on a volume (mounted read-only at {BUNDLE_MOUNT})

The pods mount the PersistentVolumeClaim `{name}-bundle` read-only. Create it with an access mode
your storage class offers for several nodes (ReadOnlyMany or ReadWriteMany), copy the bundle in
once, e.g. through a helper pod:

    kubectl run {name}-loader --image=busybox --restart=Never --overrides='{{"spec":{{"volumes":[{{"name":"b","persistentVolumeClaim":{{"claimName":"{name}-bundle"}}}}],"containers":[{{"name":"l","image":"busybox","command":["sleep","3600"],"volumeMounts":[{{"name":"b","mountPath":"/b"}}]}}]}}}}'
    kubectl cp path/to/bundle/. {name}-loader:/b/ && kubectl delete pod {name}-loader

Or bake the bundle into the image instead (no volume): `FROM {image}` + `COPY bundle {BUNDLE_MOUNT}`,
then replace the `bundle` volume in deployment.yaml with nothing and drop its volumeMount.

## 2. Apply

    kubectl apply -f .                       # Deployment + Service + PodDisruptionBudget
    # or, with KServe installed (instead of the above):
    kubectl apply -f kserve/inferenceservice.yaml

The server speaks KServe v2 (`/v2/models/{served}/infer`), TorchServe and its own routes on port
{PORT}; readiness is `/readyz`, liveness `/healthz`, metrics `/metrics` (scrape annotations set).

## 3. Autoscale on the queue depth

Install prometheus-adapter with `autoscaling/prometheus-adapter-values.yaml`, check
`kubectl get --raw /apis/custom.metrics.k8s.io/v1beta1` lists `pods/lensforge_queue_depth`, then
`kubectl apply -f autoscaling/hpa.yaml` (target: 16 images waiting per pod on average).

## Memory

request {mem_request}, limit {mem_limit}. Estimate: {BASE_MIB} MiB server + {MODEL_FACTOR} x model.onnx
({budget['model_mib']} MiB) = {budget['loaded_mib']} MiB loaded; + {budget['queue_mib']} MiB of queued inputs
= request; + {budget['decode_mib']} MiB for {DECODE_THREADS} concurrent decodes of {DEFAULT_MAX_PIXELS // 1_000_000} MP images = limit.
`--memory` overrides both.

## Shutdown

`lensforge serve --drain {DRAIN_S} --grace {GRACE_S}`: on SIGTERM readiness fails at once, the port stays
open {DRAIN_S} s while endpoints update, accepted requests get {GRACE_S} s. terminationGracePeriodSeconds is
{DRAIN_S + GRACE_S + GRACE_MARGIN_S} = drain + grace + {GRACE_MARGIN_S} s margin, so the kubelet never kills a draining pod.
"""
