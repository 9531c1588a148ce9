"""Local multi-process launcher: N processes on this machine form one JAX cluster over 127.0.0.1.

    python3 launch/local.py --num_processes=2 --devices_per_process=4 -- -m ldm_jax.train \
        --config=configs/shapes.py --workdir=/tmp/run

Each process sees `--devices_per_process` CPU devices (XLA's host-platform device count; on a GPU
box set CUDA_VISIBLE_DEVICES per process yourself) and runs `launch/run_worker.py` with the
arguments after `--`. Output lines are prefixed with the process id; the launcher exits with the
first non-zero exit status, and kills the other processes when one fails or on timeout.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

WORKER = pathlib.Path(__file__).with_name("run_worker.py")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(proc: subprocess.Popen, rank: int, sink) -> None:
    for line in proc.stdout:
        sink.write(f"[{rank}] {line}")
        sink.flush()


def launch(cmd: list[str], num_processes: int, devices_per_process: int | None = None, port: int | None = None,
           timeout: float | None = None, env: dict[str, str] | None = None) -> int:
    """Runs `run_worker.py cmd...` in `num_processes` processes; returns the first non-zero exit code (or 0)."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    port = port or free_port()
    procs = []
    for rank in range(num_processes):
        penv = dict(os.environ if env is None else env)
        penv.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                    JAX_PROCESS_ID=str(rank), PYTHONUNBUFFERED="1")
        if devices_per_process:
            flags = [f for f in penv.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            penv["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
            penv.setdefault("JAX_PLATFORMS", "cpu")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *cmd], env=penv, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    pumps = [threading.Thread(target=_pump, args=(p, r, sys.stdout), daemon=True) for r, p in enumerate(procs)]
    for t in pumps:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        # poll every process each round (any() over a generator stops at the first running one, and a process that
        # was never polled has returncode None: a failure behind a still-running process 0 went unseen)
        while any([p.poll() is None for p in procs]):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                code = failed[0] if failed else 124
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    return code or next((p.returncode for p in procs if p.returncode), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=None, help="fake CPU devices per process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is killed")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- -m module args... | -- script.py args...")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --, e.g. -- -m ldm_jax.train --config=...")
    sys.exit(launch(cmd, args.num_processes, args.devices_per_process, args.port, args.timeout))


if __name__ == "__main__":
    main()
