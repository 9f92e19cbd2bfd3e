# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup setup-arm setup-mcu demo test bench bench-accuracy gpu-bundle gpu-report clean

setup: $(STAMP)

# Re-install when the dependency list changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

# aarch64 under emulation: qemu-user and the cross toolchain (apt-get), then .arm/ (an arm64
# Python sysroot and aarch64 TVM wheels) for running aarch64 models through TVM RPC; idempotent
setup-arm: $(STAMP)
	PYTHON_VENV=$(PY) bash scripts/setup_arm.sh

# Cortex-M4 under emulation: arm-none-eabi-gcc, newlib and qemu-system-arm (apt-get, only what is
# missing), for `tvm-scalpel run OUT_DIR` on a project from `compile --target cortex-m4`; idempotent
setup-mcu:
	bash scripts/setup_mcu.sh

demo: $(STAMP)
	$(PY) -m tvm_scalpel.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_targets.py

# about 20 minutes: trains, prunes and fine-tunes LeNet-300-100 and LeNet-5 in TVM
bench-accuracy: $(STAMP)
	$(PY) benchmarks/bench_accuracy.py

# compile here for a lent GPU (cuda:sm_90): .gpu_bundle/bundle/, under 60 MiB (README, GPU section)
gpu-bundle: $(STAMP)
	PYTHON_VENV=$(PY) bash scripts/gpu_bundle.sh

# benchmarks/results/gpu.md and gpu.png from a device run's results (RESULTS=path/to/gpu_results.json)
RESULTS ?= .gpu_bundle/gpu_results.json
gpu-report: $(STAMP)
	$(PY) benchmarks/bench_gpu.py report $(RESULTS)

clean:
	rm -rf $(VENV) .arm .gpu_bundle build *.egg-info demo_out
