"""The GPU run installs nothing from the network (the device machine reaches nothing): every distribution
the worker imports at run time is in the device's image or among the wheels `scripts/gpu-run.sh prep`
carries (../shared/tools/device-prep.sh's and scripts/device-requirements.txt's), installed there with
--no-deps, so what a carried wheel requires must be carried too or be in the image."""
import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from qaio_testing import REPO

# Of what the walk below reaches, what the device image holds (the tool library's device/KINDS.md, as read
# on a device machine on 2026-11-17); its torch is the CUDA build, whose own requirements are the image's.
DEVICE_IMAGE = {"torch", "numpy", "safetensors", "huggingface-hub", "prometheus-client", "nvidia-ml-py",
                "werkzeug", "jinja2", "markupsafe", "click", "packaging", "pyyaml", "regex", "tqdm", "typer",
                "aiohttp", "triton"}
# Beside the worker's own dependencies, the GPU run needs its load clients' (bench/load.py) and the kernels'.
GPU_RUN_EXTRAS = ["aiohttp", "triton"]
DEVICE_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                      "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                      "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def worker_requirements() -> list[Requirement]:
    """worker/pyproject.toml's run-time dependencies."""
    pyproject = tomllib.loads((REPO / "worker" / "pyproject.toml").read_text())
    return [Requirement(r) for r in pyproject["project"]["dependencies"]]


def carried_wheels() -> dict[str, str]:
    """name -> pinned version of every wheel the prep downloads."""
    prep = (REPO.parent / "shared" / "tools" / "device-prep.sh").read_text()
    pins = re.search(r"for req in (.*?); do", prep, re.S).group(1).replace("\\\n", " ").split()
    pins += [line.split("#")[0].strip() for line in (REPO / "scripts" / "device-requirements.txt").read_text().splitlines()]
    return {canonicalize_name(name): version for name, version in (pin.split("==") for pin in pins if pin)}


def needs_at_run_time() -> set[str]:
    """The worker's dependencies, the GPU run's, and, through this environment's metadata, what each carried one requires
    on the device (its image's packages are taken as they are there)."""
    todo = worker_requirements() + [Requirement(r) for r in GPU_RUN_EXTRAS]
    needed: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in needed or (requirement.marker and not requirement.marker.evaluate(DEVICE_ENVIRONMENT)):
            continue
        needed.add(name)
        if name not in DEVICE_IMAGE:
            todo += [Requirement(r) for r in distribution(name).requires or []]
    return needed


def test_every_dependency_of_the_worker_is_in_the_device_image_or_carried_by_the_prep():
    missing = needs_at_run_time() - DEVICE_IMAGE - set(carried_wheels())
    assert not missing, f"the GPU run would fail to import these on the device: {sorted(missing)}"


def test_the_carried_wheels_are_the_versions_the_worker_pins_and_runs_here():
    pinned = {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in worker_requirements()}
    for name, version in carried_wheels().items():
        assert version == pinned.get(name, version), (name, version, pinned[name])
        try:
            assert distribution(name).version == version, (name, version)
        except PackageNotFoundError:
            raise AssertionError(f"{name} is carried to the device but not installed here") from None
