"""``slimdeploy build``: a bundle's TensorRT engines, built on the target and checked there.

    result = build_bundle("bundle/")
    result.report.passed  # parity of the engines against the bundle's golden outputs

Steps: read the bundle (files verified); refuse forms TensorRT is not offered (``compact``);
import TensorRT (exit 3 with the install command when missing, or outside 10.3 to 11.x); follow
the build plan the export recorded in the manifest's ``trt`` section (or make one, for a bundle
exported for ONNX Runtime), one engine per graph, sharing and keeping the timing cache; write
the engines, the cache and the updated manifest (file hashes included) atomically; then run
``check`` with the TensorRT runner at the bundle's batch sizes that lie in the engines' range,
and record its summary in the manifest. Engines whose check fails stay in the bundle so they can
be inspected; the caller decides the exit code (the CLI exits 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimdeploy.bundle import TENSORRT, load_bundle, update_bundle
from slimdeploy.engines.trt_build import (
    BUILD_README,
    BUILD_SCRIPT,
    TIMING_CACHE,
    BuildSpec,
    build_engine,
    build_plan,
    build_readme,
    build_script,
    engine_batch_range,
    import_tensorrt,
    refuse_form,
    trt_version,
    version_matches,
)
from slimdeploy.errors import BadInputError
from slimdeploy.files import check_writable_location
from slimdeploy.parity import ParityReport


@dataclass
class BuildResult:
    """What ``build_bundle`` produced: the bundle, its manifest, and the engines' parity report
    (None when the check was not run)."""

    bundle: Path
    manifest: dict[str, Any]
    report: ParityReport | None

    @property
    def passed(self) -> bool:
        """True when the engines passed their check, or when no check ran."""
        return self.report is None or self.report.passed


def build_bundle(
    path: str | Path,
    *,
    trt_version_expected: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build the TensorRT engines of a bundle into it, then check them.

    Args:
        path: the bundle directory.
        trt_version_expected: the TensorRT version the engines are meant for, compared part by
            part with the installed version (the one recorded with the engines): ``"10.3"``
            accepts any 10.3 build, ``"10.3.0.30"`` only that one, since engines only run on the
            TensorRT build that made them. Defaults to whatever is installed.
        overrides: ``BuildSpec`` fields (``min_batch``, ``opt_batch``, ``max_batch``,
            ``workspace_mb``, ``tf32``) replacing the ones the export recorded (or the defaults,
            for a bundle exported for ONNX Runtime). Defaults to none.
        check: run the parity check with the TensorRT runner afterwards. Defaults to True.
        progress: callable told each step. Defaults to silence.
    """
    say = progress or (lambda _message: None)
    bundle = load_bundle(path)
    # The engines are written into a copy beside the bundle: that folder must take it.
    check_writable_location(bundle.path.resolve())
    manifest = dict(bundle.manifest)
    form = manifest.get("dynamic")
    refuse_form(form)
    trt = import_tensorrt()
    version = trt_version(trt) or "unknown"
    if trt_version_expected and version != "unknown" and not version_matches(version, trt_version_expected):
        raise BadInputError(
            f"TensorRT {version} is installed but --trt-version {trt_version_expected} was asked for (every part "
            f"given must match): engines run only on the TensorRT build that made them | Fix: use the matching "
            "container, or drop --trt-version"
        )
    recorded = manifest.get("trt") or {}
    spec = BuildSpec.resolve(recorded.get("spec", {}), overrides or {})
    files: dict[str, bytes] = {}
    if not recorded or recorded.get("spec") != spec.to_dict():
        import onnx

        say("making the build plan")
        graphs = {graph["name"]: (graph["file"], onnx.load(str(bundle.file(graph["file"])), load_external_data=False))
                  for graph in bundle.graphs}
        plan = {**recorded, **build_plan(graphs, spec, form, bundle_name=bundle.path.name)}
        # The bundle's build instructions follow the new plan.
        files[BUILD_README] = build_readme(plan, form).encode()
        files[BUILD_SCRIPT] = build_script(plan).encode()
    else:
        plan = dict(recorded)
    # Only a cache the manifest lists (and so verified) is read; an unlisted one is ignored.
    cache = bundle.file(TIMING_CACHE).read_bytes() if bundle.has_file(TIMING_CACHE) else b""
    started = time.perf_counter()
    engines: dict[str, str] = {}
    for index, entry in enumerate(plan["graphs"], start=1):
        say(f"building engine {index}/{len(plan['graphs'])}: {entry['name']}")
        built = build_engine(bundle.file(entry["onnx"]), entry["shapes"], spec, timing_cache=cache, trt=trt)
        cache = built.timing_cache
        files[entry["engine"]] = built.engine
        engines[entry["name"]] = entry["engine"]
    files[TIMING_CACHE] = cache
    plan["engines"] = engines
    plan["built"] = {
        "tensorrt": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 3),
        "parity": None,
    }
    manifest["trt"] = plan
    say("writing the engines into the bundle")
    update_bundle(bundle.path, files, manifest)
    report = None
    if check:
        from slimdeploy.parity import check_bundle

        # The engines' own range: a static-batch graph is fixed at its ONNX batch.
        low, high = engine_batch_range(plan)
        sizes = [b for b in manifest.get("golden", {}).get("batch_sizes", []) if low <= b <= high] or [low, high]
        report = check_bundle(bundle.path, batch_sizes=sorted(set(sizes)), device=TENSORRT, progress=say)
        manifest = load_bundle(bundle.path).manifest
        manifest["trt"]["built"]["parity"] = report.summary()
        update_bundle(bundle.path, {}, manifest)
    return BuildResult(bundle.path, manifest, report)
