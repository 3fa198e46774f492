"""`lensforge export --to kserve`: Kubernetes / KServe manifests that the Kubernetes OpenAPI
models accept, whose command line, ports and probe paths are the real `lensforge serve`'s
(parsed with its own argparse parser, probed on the real app), and bad input in one line."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from serving import LiveServer, conv_bundle

from lensforge.cli import main
from lensforge.cli.options import build_parser
from lensforge.errors import ExportError
from lensforge.export import kserve
from lensforge.export.kserve import export_kserve, memory_budget, validate
from lensforge.runtime import load_bundle

SRC = Path(__file__).resolve().parents[1] / "src" / "lensforge"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real classifier bundle at 224 px (onnx.helper graph: no torch, no training)."""
    return conv_bundle(tmp_path_factory.mktemp("kserve") / "photos_v1.2" / "bundle", size=224)


@pytest.fixture(scope="module")
def out(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_kserve(bundle, tmp_path_factory.mktemp("k8s") / "manifests", image="registry.example/lf:1", cpus=3)


def load(out: Path, rel: str) -> dict[str, Any]:
    return yaml.safe_load((out / rel).read_text())


def containers(out: Path) -> list[dict[str, Any]]:
    """The containers of the Deployment and of the InferenceService's predictor."""
    return [*load(out, "deployment.yaml")["spec"]["template"]["spec"]["containers"],
            *load(out, "kserve/inferenceservice.yaml")["spec"]["predictor"]["containers"]]


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_layout_and_every_manifest_passes_the_kubernetes_models(out: Path) -> None:
    top = sorted(p.name for p in out.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    # `kubectl apply -f DIR` (not recursive) applies exactly the plain Kubernetes trio
    assert top == ["deployment.yaml", "poddisruptionbudget.yaml", "service.yaml"]
    kinds = {}
    for path in [*out.glob("*.yaml"), out / "kserve/inferenceservice.yaml", out / "autoscaling/hpa.yaml"]:
        doc = yaml.safe_load(path.read_text())
        validate(doc)  # read back from disk, not the dicts the exporter held
        kinds[doc["kind"]] = doc
    assert set(kinds) == {"Deployment", "Service", "PodDisruptionBudget", "InferenceService", "HorizontalPodAutoscaler"}
    assert "&id" not in (out / "deployment.yaml").read_text()  # no YAML anchors in manifests people read
    assert (out / "README.md").is_file() and (out / "autoscaling/prometheus-adapter-values.yaml").is_file()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}), "readinesProbe"),
    (lambda d: d["spec"].update(replicas="two"), "replicas"),
    (lambda d: d["spec"]["template"]["spec"].pop("containers"), "containers"),
])
def test_validation_catches_misspelt_fields_wrong_types_and_missing_required(out: Path, edit: Any, message: str) -> None:
    doc = load(out, "deployment.yaml")
    edit(doc)
    with pytest.raises(ExportError, match=message):
        validate(doc)


def test_inferenceservice_pod_is_checked_as_a_podspec(out: Path) -> None:
    doc = load(out, "kserve/inferenceservice.yaml")
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["spec"]["predictor"]["containers"][0]["name"] == "kserve-container"
    doc["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(ExportError, match="spec.predictor"):
        validate(doc)


def test_container_command_is_a_valid_lensforge_serve_command_line(out: Path) -> None:
    served_name = "photos_v1.2"  # the run directory's name: the /v2/models/<name> clients call
    for c in containers(out):
        argv = c["command"] + c["args"]
        assert argv[:2] == ["lensforge", "serve"]
        for flag in (a for a in argv[2:] if a.startswith("-")):  # each flag exists in the real parser
            assert flag in serve_parser()._option_string_actions, flag
        args = build_parser().parse_args(argv[1:])
        assert args.bundles == [kserve.BUNDLE_MOUNT] and args.name == [served_name] and args.host == "0.0.0.0"
        assert args.threads == 3 and c["resources"]["limits"]["cpu"] == "3"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": args.port}
        # the kubelet SIGKILLs at terminationGracePeriodSeconds: it must outlast the server's drain + grace
        pod = load(out, "deployment.yaml")["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > args.drain + args.grace
        assert {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}[kserve.BUNDLE_MOUNT] is True
        assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["runAsUser"] != 0
        assert c["image"] == "registry.example/lf:1"
        # probes and ports name only the container's own port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] in ports
    assert build_parser().parse_args(["export", "b", "--to", "kserve"]).image == kserve.DEFAULT_IMAGE


def test_env_vars_exist_in_lensforge_serve(out: Path) -> None:
    """Every environment variable the manifests set is one the server reads."""
    read = set()
    for path in [*(SRC / "serve").glob("*.py"), *(SRC / "runtime").glob("*.py"), SRC / "hardware.py"]:
        read |= set(re.findall(r"environ(?:\.get)?[\[(]\s*[\"']([A-Z0-9_]+)[\"']", path.read_text()))
        read |= {m for m in re.findall(r"[\"']([A-Z][A-Z0-9_]+)[\"']\s+(?:not )?in os\.environ", path.read_text())}
    assert "MALLOC_ARENA_MAX" in read  # the scan itself finds what serve/memory.py reads
    for c in containers(out):
        for env in c.get("env", []):
            assert env["name"] in read, env["name"]


def test_probe_paths_and_metrics_answer_on_the_real_app(out: Path, bundle: Path) -> None:
    from lensforge.serve import create_app

    c = containers(out)[0]
    paths = {c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    annotations = load(out, "deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(c["ports"][0]["containerPort"])
    metric = load(out, "autoscaling/hpa.yaml")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    args = build_parser().parse_args((c["command"] + c["args"])[1:])
    app = create_app({args.name[0]: bundle})
    with LiveServer(app) as s:
        for path in paths:
            assert requests.get(s.url + path, timeout=10).status_code == 200, path
        body = requests.get(s.url + annotations["prometheus.io/path"], timeout=10).text
        assert re.search(rf'^{metric}\{{model="{re.escape(args.name[0])}"\}} ', body, re.MULTILINE), body[:500]
        # the v2 route the InferenceService is for, under the served name
        assert requests.get(f"{s.url}/v2/models/{args.name[0]}/ready", timeout=10).status_code == 200


def test_hpa_and_pdb_target_the_deployment(out: Path) -> None:
    dep, hpa, pdb, svc = (load(out, f) for f in ("deployment.yaml", "autoscaling/hpa.yaml",
                                                  "poddisruptionbudget.yaml", "service.yaml"))
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == dep["spec"]["replicas"] >= 2
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"] == labels == svc["spec"]["selector"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", dep["metadata"]["name"])  # DNS-1035, from "photos_v1.2"


def test_memory_from_the_bundle_and_the_override(out: Path, bundle: Path, tmp_path: Path) -> None:
    b = load_bundle(bundle)
    budget = memory_budget(b)
    model_mib = -(-b.model_path.stat().st_size // (1024 * 1024))
    assert budget["loaded_mib"] == kserve.BASE_MIB + -(-kserve.MODEL_FACTOR * b.model_path.stat().st_size // 2**20)
    assert budget["model_mib"] == model_mib
    assert budget["request_mib"] > budget["loaded_mib"] and budget["limit_mib"] == budget["request_mib"] + budget["decode_mib"]
    res = containers(out)[0]["resources"]
    assert res["requests"]["memory"] == f"{budget['request_mib']}Mi" and res["limits"]["memory"] == f"{budget['limit_mib']}Mi"
    # a bigger input side queues bigger tensors: the estimate follows the bundle, not a constant
    big = memory_budget(load_bundle(conv_bundle(tmp_path / "big", size=448)))
    assert big["queue_mib"] > budget["queue_mib"]
    o = export_kserve(bundle, tmp_path / "m", memory="3Gi")
    r = yaml.safe_load((o / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert r["requests"]["memory"] == r["limits"]["memory"] == "3Gi"


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    o, err = capsys.readouterr()
    return code, o, err


def test_cli_writes_then_refuses_bad_input_in_one_line(bundle: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "k"
    code, _, err = run_cli(["export", bundle, "--to", "kserve", "--out", dest, "--replicas", "3"], capsys)
    assert code == 0, err
    assert load(dest, "deployment.yaml")["spec"]["replicas"] == 3
    for argv, words in [
        (["export", bundle, "--to", "kserve", "--out", dest], "already exists"),  # no --overwrite
        (["export", tmp_path, "--to", "kserve", "--out", tmp_path / "x"], "not a lensforge bundle"),
        (["export", bundle, "--to", "kserve", "--out", tmp_path / "y", "--memory", "lots"], "invalid memory"),
        (["export", bundle, "--to", "kserve", "--out", tmp_path / "z", "--memory", "16Mi"], "OOM"),
    ]:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    code, _, err = run_cli(["export", bundle, "--to", "kserve", "--out", dest, "--overwrite", "--replicas", "4"], capsys)
    assert code == 0 and load(dest, "deployment.yaml")["spec"]["replicas"] == 4


def test_readme_scaling_out_commands_parse_and_match_the_manifests() -> None:
    """The README documents no flag that does not exist, and the serve line it quotes is the one generated."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    export_line = next(ln for ln in section.splitlines() if ln.startswith("lensforge export"))
    args = build_parser().parse_args(export_line.split()[1:])
    assert args.to == "kserve"
    quoted = re.search(r"`(lensforge serve [^`]+)`", section).group(1).split()
    assert quoted == kserve.serve_args("photos-classify", 2)
    assert f"{kserve.DRAIN_S + kserve.GRACE_S + kserve.GRACE_MARGIN_S} = drain {kserve.DRAIN_S}" in section
