"""Joining a multi-process job, with a deadline and a message naming who never came.

``jax.distributed.initialize`` aborts the whole process (a C++ fatal error, minutes later by
default) when a peer never connects, without saying which. When the coordinator address is
given, the processes first meet in a small TCP rendezvous on the next port: process 0 waits
up to ``timeout_s`` for every other process to report its index, then releases them all; on
timeout each side raises RunError naming the missing processes (or the silent coordinator).
Auto-detected clusters (TPU pods, SLURM) go straight to jax with the same timeout.
"""
from __future__ import annotations

import contextlib
import socket
import time

import jax

from aff_jax.training.errors import RunError

_GO = b'go\n'


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int) -> None:
    """Join the job (``jax.distributed.initialize``), or raise RunError within ``timeout_s``."""
    if coordinator is not None and num_processes is not None and process_id is not None:
        host, _, port = coordinator.rpartition(':')
        address = (host or '127.0.0.1', int(port) + 1)
        if process_id == 0:
            _wait_for_peers(address, num_processes, timeout_s)
        else:
            _report_to_coordinator(address, process_id, num_processes, timeout_s)
    # CPU devices of different processes talk through gloo; TPU and GPU ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout_s)


def _wait_for_peers(address: tuple[str, int], num_processes: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    peers = {}
    with socket.create_server(address, reuse_port=False) as server:
        while len(peers) < num_processes - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(1, num_processes)) - set(peers))
                for connection in peers.values():
                    connection.close()
                raise RunError(
                    f'process(es) {", ".join(map(str, missing))} of {num_processes} never joined '
                    f'within config.distributed_timeout_s={timeout_s:g} s (waiting on '
                    f'{address[0]}:{address[1]}); start them with --process_id, or check that '
                    f'they can reach this host')
            server.settimeout(remaining)
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            # Anything else that connects (a late duplicate, a port scanner) is dropped, not
            # allowed to end the wait with a traceback.
            connection.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                index = int(connection.makefile('rb').readline())
            except (OSError, ValueError):
                index = -1
            if not 0 < index < num_processes:
                connection.close()
                continue
            if index in peers:  # the peer gave up waiting and reconnected
                peers[index].close()
            peers[index] = connection
        for connection in peers.values():
            with contextlib.suppress(OSError):
                connection.sendall(_GO)
            connection.close()


def _report_to_coordinator(address: tuple[str, int], process_id: int, num_processes: int,
                           timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(address, timeout=max(deadline - time.monotonic(), 0.1)
                                          ) as connection:
                connection.sendall(f'{process_id}\n'.encode())
                connection.settimeout(max(deadline - time.monotonic(), 0.1))
                if connection.makefile('rb').readline() == _GO:
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RunError(
                f'process {process_id} of {num_processes}: the coordinator (process 0, '
                f'rendezvous at {address[0]}:{address[1]}) did not bring all processes together '
                f'within config.distributed_timeout_s={timeout_s:g} s; is process 0 running?')
        time.sleep(0.2)
