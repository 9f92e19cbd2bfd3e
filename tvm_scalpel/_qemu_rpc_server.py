"""A TVM RPC server, run by the *emulated* aarch64 Python (see ``tvm_scalpel.emulation``).

Usage: ``python3.11 -u _qemu_rpc_server.py HOST PORT PORT_END``. It imports nothing but TVM
(the emulated Python sees only ``.arm/pyarm``), starts the server in this process
(``python -m tvm.exec.rpc_server`` re-executes ``sys.executable``, which fails under
qemu-user), prints ``tvm-scalpel-rpc-ready PORT`` and serves until it is killed.
"""

import sys

from tvm.rpc.server import PopenRPCServerState

READY = "tvm-scalpel-rpc-ready"


def main() -> None:
    host, port, port_end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state = PopenRPCServerState(host, port, port_end, silent=True)
    print(f"{READY} {state.port}", flush=True)
    state.thread.join()


if __name__ == "__main__":
    main()
