"""Floating-point precision chosen per machine: "auto" is the fastest one the device runs well.

bf16 is not faster everywhere: a matrix product runs 2.2x fp32's speed in bf16 on an AMD EPYC
with AVX-512 BF16 but 0.6x on an Intel Xeon without AMX. So "auto" times one matrix product in
each precision the device offers (a fraction of a second), keeps fp32 unless another is at least
`MIN_SPEEDUP` times faster (the rest of a model gains less than its matrix products), and caches
the result per machine (CPU or GPU model, torch version, threads) in
$ITMATCH_CACHE_DIR or ~/.cache/itmatch/precision.json. ITMATCH_PRECISION=fp32|bf16|fp16 makes
"auto" mean that precision instead.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from itmatch.errors import ConfigError, InputError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
OVERRIDE = "ITMATCH_PRECISION"
MIN_SPEEDUP = 1.25
SIZE = 1024  # of the square matrices timed: big enough for the fast kernels, quick to measure


def precision_dtype(precision: str) -> torch.dtype | None:
    """The floating type of a concrete precision (None: float32, the models' own)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join([*PRECISIONS, AUTO])}, got {precision!r}")
    return PRECISIONS[precision]


def check_precision(precision: str) -> None:
    if precision != AUTO:
        precision_dtype(precision)


@dataclass(frozen=True)
class Calibration:
    """What "auto" chose on this machine and why."""

    machine: str
    gflops: dict[str, float]  # per precision, of a SIZE x SIZE matrix product
    chosen: str

    def describe(self) -> str:
        speeds = ", ".join(f"{name} {value:.0f}" for name, value in self.gflops.items())
        return f"{self.chosen}: GFLOP/s of a {SIZE}x{SIZE} matrix product on {self.machine}: {speeds}"


def resolve(precision: str, device: torch.device) -> str:
    """A concrete precision for `precision` ("auto" is resolved for `device`)."""
    if precision != AUTO:
        return precision
    forced = os.environ.get(OVERRIDE)
    if forced:
        if forced not in PRECISIONS:
            raise ConfigError(f"{OVERRIDE}={forced!r}: must be one of {', '.join(PRECISIONS)}")
        return forced
    return calibration(device).chosen


def training_precision(precision: str, device: torch.device) -> str:
    """ "fp32" or "bf16" for training under autocast ("auto": bf16 where it is clearly faster;
    fp16 would need loss scaling, which training does not do)."""
    if precision == AUTO and not os.environ.get(OVERRIDE):
        speeds = calibration(device).gflops
        return "bf16" if speeds.get("bf16", 0) >= MIN_SPEEDUP * speeds["fp32"] else "fp32"
    chosen = resolve(precision, device)
    if chosen not in ("fp32", "bf16"):
        raise ConfigError(f"training runs in fp32 or bf16, not {chosen}")
    return chosen


@functools.cache
def calibration(device: torch.device) -> Calibration:
    """This machine's calibration, measured once and cached on disk."""
    machine = machine_name(device)
    cache = _cache_path()
    known = _read_cache(cache)
    if isinstance(known.get(machine), dict) and known[machine].get("chosen") in PRECISIONS:
        return Calibration(machine, known[machine].get("gflops", {}), known[machine]["chosen"])
    gflops = {name: _matmul_gflops(device, dtype) for name, dtype in _candidates(device).items()}
    fastest = max(gflops, key=gflops.get)
    chosen = fastest if gflops[fastest] >= MIN_SPEEDUP * gflops["fp32"] else "fp32"
    known[machine] = {"gflops": gflops, "chosen": chosen}
    _write_cache(cache, known)
    return Calibration(machine, gflops, chosen)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        # One model name covers CPUs of different instruction sets (a virtual machine's "AMD
        # EPYC" with or without AVX-512 BF16), whose bf16 speeds differ a hundredfold.
        processor = _cpu_model() or platform.processor() or platform.machine()
        extensions = [torch.backends.cpu.get_cpu_capability(), *_bf16_extensions()]
        processor += f" ({' '.join(extensions)}), {torch.get_num_threads()} threads"
    return f"{processor}, torch {torch.__version__}"


def _cpu_model() -> str | None:
    return _cpuinfo().get("model name")


def _bf16_extensions() -> list[str]:
    """The bf16 instruction-set extensions the CPU lists."""
    return sorted({"avx512_bf16", "amx_bf16"} & set(_cpuinfo().get("flags", "").split()))


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries in /proc/cpuinfo (none where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _candidates(device: torch.device) -> dict[str, torch.dtype | None]:
    if device.type == "cuda":
        return PRECISIONS if torch.cuda.is_bf16_supported() else {"fp32": None, "fp16": torch.float16}
    return {"fp32": None, "bf16": torch.bfloat16}  # fp16 products are slow on most CPUs


def _matmul_gflops(device: torch.device, dtype: torch.dtype | None, repeats: int = 5) -> float:
    a = torch.randn(SIZE, SIZE, device=device, dtype=dtype or torch.float32)
    b = torch.randn(SIZE, SIZE, device=device, dtype=dtype or torch.float32)
    a @ b  # warm-up: kernels chosen, memory allocated
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * SIZE**3 / best / 1e9


def _cache_path() -> Path:
    if os.environ.get("ITMATCH_CACHE_DIR"):
        return Path(os.environ["ITMATCH_CACHE_DIR"]) / "precision.json"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itmatch" / "precision.json"


def _read_cache(path: Path) -> dict:
    """The cached calibrations; a missing or damaged cache is measured anew, never an error."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(path: Path, known: dict) -> None:
    from itmatch.files import atomic_write

    text = (json.dumps(known, indent=2) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: file.write(text))
    except OSError:
        pass  # an unwritable cache only costs a new measurement next time
