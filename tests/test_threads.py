"""Exported libraries use every core wherever they are loaded (the load-time constructor)."""

import json
import os
import subprocess
import sys

import pytest

from tvm_scalpel import compile_onnx, export_library
from tvm_scalpel.models import mlp

# A fresh interpreter that loads the library with plain TVM, as the README shows, never
# importing tvm_scalpel; it reports the pool size and what getenv sees after the load.
PROBE = r"""
import ctypes, json, sys
import numpy as np, tvm
assert "tvm_scalpel" not in sys.modules
lib = tvm.runtime.load_module(sys.argv[1])
vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
y = vm["main"](tvm.runtime.tensor(np.ones((2, 64), np.float32))).numpy()
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p
env = libc.getenv(b"TVM_NUM_THREADS")
print(json.dumps({"threads": int(tvm.get_global_func("runtime.NumThreads")()),
                  "env": env.decode() if env else None, "shape": list(y.shape)}))
"""


def _probe(lib: str, env_threads: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if env_threads is not None:
        env["TVM_NUM_THREADS"] = env_threads
    out = subprocess.run([sys.executable, "-c", PROBE, lib], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("threads") / "model.so"
    export_library(compile_onnx(mlp([64, 32, 10], seed=1)).executable, path)
    return str(path)


def test_library_sets_all_cores_when_unset(library):
    cores = len(os.sched_getaffinity(0))
    report = _probe(library, None)
    assert report["env"] == str(cores)
    assert report["threads"] == cores
    assert report["shape"] == [2, 10]


def test_library_keeps_the_users_setting(library):
    report = _probe(library, "1")
    assert report["env"] == "1"
    assert report["threads"] == 1
