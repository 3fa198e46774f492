"""schemathesis over every operation of ``lensforge serve``'s ``/openapi.json`` (RELIABILITY.md figure 6).

The long version of tests/test_serve_fuzz.py. One run, loopback only: a tiny classifier and a
tiny detector are trained on generated data (as tests/conftest.py does, ~1 min), served by
one real uvicorn server (lifespan on, ``/readyz`` 200 first), and every operation in the
schema it publishes gets ``--examples`` generated requests (derandomized) checked with
``not_a_server_error`` and ``response_schema_conformance``. Operations with a model in the
path run once per served model and once with generated names; each in schemathesis'
positive mode (inputs the schema allows) and negative mode (inputs it forbids).

Prints one row per operation, binding and mode: cases sent (0 in negative mode when the
operation has no input to break), failing cases (5xx, response schema), seconds, status codes
seen; then the goal (0 ``not_a_server_error`` failures over >= 200 examples per operation).

    python bench/fuzz_openapi.py                 # 200 examples per operation, ~5 min on 2 cores
    python bench/fuzz_openapi.py --examples 50   # ~2 min (--workdir DIR keeps the trained models)
"""

from __future__ import annotations

import argparse
import collections
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup, ServerError
from schemathesis.specs.openapi.checks import response_schema_conformance

import lensforge
from lensforge.data.demo import make_demo_dataset, make_demo_detection
from lensforge.hardware import describe
from lensforge.serve import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import LiveServer

CHECKS = [not_a_server_error, response_schema_conformance]


def train_bundles(root: Path) -> dict[str, Path]:
    """The tests' tiny models: a 4-class shapes classifier (64 px) and a Lite0-FPN detector (96 px),
    trained under ``root`` unless a previous run left them there."""
    found = {name: root / f"{name}-bundle" for name in ("shapes", "boxes")}
    if all((path / "lensforge.json").is_file() for path in found.values()):
        return found
    shapes = make_demo_dataset(root / "shapes", n_per_class=10, size=64)
    boxes = make_demo_detection(root / "detect", n_train=12, n_val=6, n_test=6, size=96, max_objects=3)
    cls = lensforge.train(data=str(shapes), out=str(root / "shapes-run"), image_size=64, epochs=1, max_steps=3,
                          batch_size=8)
    det = lensforge.train(data=str(boxes), out=str(root / "detect-run"), image_size=96, epochs=1, max_steps=2,
                          batch_size=4, lr=1e-6)
    for name, run in (("shapes", cls), ("boxes", det)):
        shutil.copytree(run.bundle_dir, found[name], dirs_exist_ok=True)
    return found


def bind(operation: object, model: str) -> dict[str, str]:
    """Path parameters that pin ``operation`` to ``model`` (and KServe's one version, "1"), so
    generated bodies reach decoding and inference instead of stopping at 404."""
    values = {"model": model, "name": model, "model_name": model, "version": "1"}
    return {p.name: values[p.name] for p in operation.path_parameters if p.name in values}  # type: ignore[attr-defined]


def fuzz_operation(operation: object, base_url: str, examples: int, path_parameters: dict[str, str],
                   mode: GenerationMode) -> tuple[int, collections.Counter[str], list[str]]:
    """(cases sent, failing cases by kind ("5xx", "schema"), the status code of each case) for one operation."""
    failed: collections.Counter[str] = collections.Counter()
    statuses: list[str] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))  # type: ignore[attr-defined]
    def run(case: schemathesis.Case) -> None:
        try:
            response = case.call(base_url=base_url, timeout=30)
            statuses.append(str(response.status_code))
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            for kind in {"5xx" if isinstance(f, ServerError) else "schema" for f in group.exceptions}:
                failed[kind] += 1
            logging.getLogger("fuzz").warning("%s\n%s", operation.label, case.as_curl_command())  # type: ignore[attr-defined]

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with no input to break (GET /ping): nothing to send
        pass
    return len(statuses), failed, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="generated cases per operation, binding and mode")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the trained bundles here and reuse them next time (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="2 examples per operation: checks the script still runs "
                        "and prints its table (the training of the two tiny models still takes ~1 min)")
    args = parser.parse_args()
    if args.smoke:
        args.examples = 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    print(f"# schemathesis {schemathesis.__version__} over /openapi.json, {args.examples} examples per operation, "
          f"binding and mode (positive: inputs the schema allows, negative: inputs it forbids); "
          f"checks: not_a_server_error, response_schema_conformance")
    print(f"# {describe()} | lensforge {lensforge.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        bundles = train_bundles(args.workdir or Path(tmp))
        app = create_app(bundles, max_wait_ms=1, max_body_bytes=1 << 20)
        with LiveServer(app) as server:
            api = schemathesis.openapi.from_url(server.url + "/openapi.json")
            operations = [result.ok() for result in api.get_all_operations()]
            print(f"{'operation':52} {'model':>9} {'mode':>8} {'examples':>8} {'5xx':>4} {'schema':>6} {'s':>5}  "
                  "statuses")
            total_cases = total_5xx = total_schema = 0
            started = time.perf_counter()
            for op in operations:
                bindings = [*bundles, "generated"] if op.path_parameters else ["-"]
                for binding in bindings:
                    bound = bind(op, binding) if binding in bundles else {}
                    for mode in GenerationMode:
                        t = time.perf_counter()
                        cases, failed, statuses = fuzz_operation(op, server.url, args.examples, bound, mode)
                        seen = " ".join(f"{code}:{n}" for code, n in sorted(collections.Counter(statuses).items()))
                        print(f"{op.label:52} {binding:>9} {mode.value:>8} {cases:8d} {failed['5xx']:4d} "
                              f"{failed['schema']:6d} {time.perf_counter() - t:5.1f}  {seen}", flush=True)
                        total_cases += cases
                        total_5xx += failed["5xx"]
                        total_schema += failed["schema"]
            elapsed = time.perf_counter() - started
    print(f"# total: {len(operations)} operations, {total_cases} requests in {elapsed:.0f} s, "
          f"{total_5xx} not_a_server_error failures, {total_schema} response-schema failures")
    print(f"# goal (0 not_a_server_error failures, >= 200 examples per operation): "
          f"{'met' if total_5xx == 0 and args.examples >= 200 else 'NOT met'}")


if __name__ == "__main__":
    main()
