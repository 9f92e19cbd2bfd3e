"""Run a Cortex-M4 C project (model.json, model.h, sources) under qemu-system-arm and count the
instructions of its model call.

``build_firmware`` compiles the project's sources with arm-none-eabi-gcc for the M4F and links
them with the runner's own startup and main (firmware_template/: vector table, FPU enable,
newlib semihosting) into an ELF for qemu's ``mps2-an386`` board. ``Firmware.run`` writes the
input rows to a host file, runs qemu, which calls ``scalpel_model_run`` once per row, and reads
back the outputs and the instruction count of every call.

How instructions are counted: qemu runs with ``-icount shift=7``, so its virtual clock
advances exactly 2**7 ns per guest instruction and does not follow the host's clock. The
board's timers run from that clock (25 MHz: 40 ns a tick, so 3.2 ticks an instruction); the
firmware reads a 32-bit timer just before and just after each call, and a second one divided
by 256 to count the first one's wraps. Ticks / 3.2, rounded, is exact (a reading is off by at
most one tick, 0.31 of an instruction). The same measurement around a call to an empty
function is subtracted, so N is what the model call adds to a call of a function that returns
at once. It is an instruction count, deterministic and machine-independent; it is not a time
on hardware (no pipeline, wait states, or memory timing is modelled).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ScalpelError
from .manifest import Project, load_project

log = logging.getLogger("tvm_scalpel")

GCC = "arm-none-eabi-gcc"
SIZE = "arm-none-eabi-size"
QEMU = "qemu-system-arm"
SETUP_HINT = "run `make setup-mcu` (gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm)"
CPU_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
DEFAULT_OPT = "-O2"  # before the project's cflags, which may override it
TEMPLATE = Path(__file__).resolve().parent / "firmware_template"
RUNNER_SOURCES = ("startup.c", "main.c")

ICOUNT_SHIFT = 7      # 2**7 ns of virtual time per instruction
TIMER_NS = 40         # mps2-an386's timers run at 25 MHz
COARSE_DIVIDER = 256  # the dual timer's prescaler
WRAP = 1 << 32
RECORD = 3            # uint32s per call in counts.bin: fine ticks, coarse ticks, return code

EXIT_NO_FILE, EXIT_SHORT_WRITE, EXIT_MODEL_FAILED, EXIT_FAULT = 64, 65, 66, 70
BASE_TIMEOUT_S = 60.0
TIMEOUT_PER_CALL_S = 1.0


def mcu_ready() -> str | None:
    """None when projects can be built and run here, else why not (one line)."""
    for tool in (GCC, SIZE, QEMU):
        if shutil.which(tool) is None:
            return f"{tool} not found: {SETUP_HINT}"
    try:
        specs = subprocess.run([GCC, "-print-file-name=rdimon.specs"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{GCC} does not run ({err}): {SETUP_HINT}"
    if not Path(specs).is_absolute() or not Path(specs).is_file():
        return f"newlib's rdimon.specs not found for {GCC}: {SETUP_HINT}"
    return None


def _require_tools() -> None:
    reason = mcu_ready()
    if reason is not None:
        raise ScalpelError(reason)


def ticks_to_instructions(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Instructions from the two timers' tick differences (uint32, modulo 2**32)."""
    fine = fine.astype(np.int64)
    wraps = np.rint((coarse.astype(np.float64) * COARSE_DIVIDER - fine) / WRAP).astype(np.int64)
    ticks = fine + wraps * WRAP
    # ticks * 40 / 128 rounded half up, in integers: exact
    return (ticks * TIMER_NS * 2 + (1 << ICOUNT_SHIFT)) // (2 << ICOUNT_SHIFT)


@dataclass
class McuRun:
    """What one run gave: the outputs of every call and the instructions of each call."""

    outputs: np.ndarray
    instructions: np.ndarray  # int64, one per call of scalpel_model_run

    @property
    def calls(self) -> int:
        return len(self.instructions)

    @property
    def per_call(self) -> int:
        """Instructions per call: every call's count when they are all equal (models without
        data-dependent branches), else the mean, rounded."""
        return int(round(float(np.mean(self.instructions))))

    @property
    def total(self) -> int:
        return int(np.sum(self.instructions))


@dataclass
class Firmware:
    """A linked firmware ELF for one project, and the sizes of the project's own code."""

    project: Project
    elf: Path
    flash_bytes: int  # text + data of the project's objects (what it puts in flash)
    ram_bytes: int    # data + bss of the project's objects (static RAM; the stack not counted)
    object_sizes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # text, data, bss

    def run(self, x: np.ndarray, timeout: float | None = None) -> McuRun:
        """Run the model on the rows of ``x`` (shape ``(N * b, ...)`` for a model input of shape
        ``(b, ...)``: one call per ``b`` rows) under qemu."""
        rows = _check_input(self.project, x)
        calls = len(rows)
        limit = timeout if timeout is not None else BASE_TIMEOUT_S + TIMEOUT_PER_CALL_S * calls
        with tempfile.TemporaryDirectory(prefix="scalpel-qemu-") as tmp:
            work = Path(tmp)
            (work / "input.bin").write_bytes(rows.astype("<f4").tobytes())
            cmd = [QEMU, "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
                   "-semihosting-config", "enable=on,target=native",
                   "-icount", f"shift={ICOUNT_SHIFT},align=off,sleep=off",
                   "-kernel", str(self.elf)]
            log.info("running %s", " ".join(cmd))
            try:
                done = subprocess.run(cmd, cwd=work, stdin=subprocess.DEVNULL,
                                      capture_output=True, timeout=limit)
            except subprocess.TimeoutExpired:
                raise ScalpelError(
                    f"{self.project.root}: the firmware did not finish within {limit:g} s under "
                    f"qemu ({calls} calls; does scalpel_model_run hang?); a longer --timeout "
                    "raises the limit") from None
            except OSError as err:
                raise ScalpelError(f"{QEMU} does not run: {err}") from None
            counts = _read_counts(work / "counts.bin")
            if done.returncode != 0:
                raise ScalpelError(self._failure(done, counts))
            out_size = self.project.output.size
            flat = np.fromfile(work / "output.bin", dtype="<f4")
        if len(counts) != calls + 1 or flat.size != calls * out_size:
            raise ScalpelError(f"{self.project.root}: the firmware wrote {len(counts) - 1} of "
                               f"{calls} results")
        instructions = ticks_to_instructions(counts[:, 0], counts[:, 1])
        out_shape = self.project.output.shape
        outputs = flat.reshape((calls * out_shape[0], *out_shape[1:])).astype(np.float32)
        return McuRun(outputs=outputs, instructions=instructions[1:] - instructions[0])

    def _failure(self, done: subprocess.CompletedProcess, counts: np.ndarray) -> str:
        """One line for a firmware that stopped early; counts.bin holds the baseline record,
        then one record per call that returned."""
        root, code = self.project.root, done.returncode
        if code == EXIT_MODEL_FAILED:  # that call's record was written, then the firmware stopped
            rc = int(counts[-1, 2].astype(np.int32))
            return f"{root}: scalpel_model_run returned {rc} on input row {len(counts) - 2}"
        if code == EXIT_FAULT:
            if not len(counts):
                return f"{root}: the firmware faulted before its first call"
            return (f"{root}: the firmware faulted (HardFault / BusFault / UsageFault) in "
                    f"scalpel_model_run on input row {len(counts) - 1}")
        if code in (EXIT_NO_FILE, EXIT_SHORT_WRITE):
            return f"{root}: the firmware could not read or write its semihosting files"
        text = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        return f"{QEMU} exited with status {code}" + (f": {text[-1]}" if text else "")


def _read_counts(path: Path) -> np.ndarray:
    if not path.is_file():
        return np.zeros((0, RECORD), np.uint32)
    raw = np.fromfile(path, dtype="<u4")
    return raw[: len(raw) // RECORD * RECORD].reshape(-1, RECORD)


def _check_input(project: Project, x) -> np.ndarray:
    """``x`` as float32 rows, one call's input each: shape (calls, input size)."""
    x = np.asarray(x)
    shape = project.input.shape
    wanted = "(N" + "".join(f", {d}" for d in shape[1:]) + ")"
    if x.dtype.kind not in "fiu":
        raise ScalpelError(f"input dtype {x.dtype}; the model takes float32")
    if x.ndim != len(shape) or tuple(x.shape[1:]) != shape[1:] or x.shape[0] % shape[0]:
        per = f"; N a multiple of {shape[0]}" if shape[0] > 1 else ""
        raise ScalpelError(f"input has shape {tuple(x.shape)}; the model takes {wanted}{per}")
    if x.shape[0] == 0:
        raise ScalpelError("input has no rows")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, project.input.size)


def build_firmware(project: Project | str | Path, build_dir: str | Path) -> Firmware:
    """Compile the project (never writing into its folder) and link the firmware in ``build_dir``."""
    _require_tools()
    if not isinstance(project, Project):
        project = load_project(project)
    build = Path(build_dir)
    build.mkdir(parents=True, exist_ok=True)
    objects = []
    for i, source in enumerate(project.sources):
        obj = build / f"model_{i}_{source.stem}.o"
        _gcc([*CPU_FLAGS, DEFAULT_OPT, *project.cflags, "-I", str(project.root), "-c",
              str(source), "-o", str(obj)], project, source)
        objects.append(obj)
    objects += list(project.objects)
    sizes = _object_sizes(objects)
    runner = []
    for name in RUNNER_SOURCES:
        obj = build / f"runner_{Path(name).stem}.o"
        _gcc([*CPU_FLAGS, "-O2", "-std=c11", "-I", str(TEMPLATE), "-I", str(project.root),
              f"-DRUNNER_INPUT_SIZE={project.input.size}",
              f"-DRUNNER_OUTPUT_SIZE={project.output.size}", "-c", str(TEMPLATE / name),
              "-o", str(obj)], project, TEMPLATE / name)
        runner.append(obj)
    elf = build / "firmware.elf"
    _gcc([*CPU_FLAGS, "--specs=rdimon.specs", "-nostartfiles", "-T", str(TEMPLATE / "link.ld"),
          *map(str, runner + objects), "-lm", "-o", str(elf)], project, None)
    flash = sum(text + data for text, data, _ in sizes.values())
    ram = sum(data + bss for _, data, bss in sizes.values())
    return Firmware(project=project, elf=elf, flash_bytes=flash, ram_bytes=ram, object_sizes=sizes)


@contextlib.contextmanager
def firmware_for(project: Project | str | Path) -> Iterator[Firmware]:
    """A firmware built in a temporary folder, removed afterwards: build once, run many times."""
    with tempfile.TemporaryDirectory(prefix="scalpel-fw-") as tmp:
        yield build_firmware(project, tmp)


def run_project(project: Project | str | Path, x, timeout: float | None = None) -> McuRun:
    """Build the project's firmware and run it on ``x`` (see ``Firmware.run``)."""
    with firmware_for(project) as firmware:
        return firmware.run(x, timeout=timeout)


def _gcc(args: list[str], project: Project, source: Path | None) -> None:
    try:
        done = subprocess.run([GCC, *args], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ScalpelError(f"{GCC} failed: {err}") from None
    if done.returncode == 0:
        return
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    first = next((line for line in lines if "error" in line), lines[-1] if lines else "")
    log.info("%s", done.stderr)
    if "differs from model.json" in done.stderr:
        raise ScalpelError(f"{project.root}: model.h and model.json disagree on the input or "
                           "output size")
    if "overflowed" in first or "will not fit" in first:
        raise ScalpelError(f"{project.root}: the firmware does not fit the emulated board's "
                           "4 MiB of code or data memory")
    if source is None:
        raise ScalpelError(f"{project.root}: the firmware does not link: {_short(first)}")
    where = source.name if source.parent != TEMPLATE else f"the runner's {source.name}"
    raise ScalpelError(f"{project.root}: {where} does not compile for the Cortex-M4: {_short(first)}")


def _short(line: str) -> str:
    """A compiler message without the long path in front of it."""
    return line.split(": ", 1)[1] if line.startswith("/") and ": " in line else line


def _object_sizes(objects: list[Path]) -> dict[str, tuple[int, int, int]]:
    """text, data, bss bytes per object (arm-none-eabi-size, Berkeley format)."""
    if not objects:
        return {}
    done = subprocess.run([SIZE, "-B", *map(str, objects)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ScalpelError(f"{SIZE} failed: {done.stderr.strip().splitlines()[-1:]}")
    sizes = {}
    for line in done.stdout.splitlines()[1:]:
        cells = line.split()
        if len(cells) >= 6:
            sizes[Path(cells[5]).name] = (int(cells[0]), int(cells[1]), int(cells[2]))
    return sizes


__all__ = ["Firmware", "McuRun", "build_firmware", "firmware_for", "mcu_ready", "run_project",
           "ticks_to_instructions"]
