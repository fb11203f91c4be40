"""Join several processes into one JAX job: cluster auto-detection or an explicit coordinator.

On CPU the processes exchange collectives over gloo, which is how multi-host code runs on one
machine: ``initialize("localhost:12355", num_processes=2, process_id=i)`` in each process.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax


class DistributedError(ValueError):
    """Cluster settings that cannot start a job."""


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str = "gloo",
    timeout_s: int = 300,
) -> None:
    """Start this process's part of a multi-process job; call before JAX touches a device.

    With no arguments JAX detects the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes).
    Otherwise give all three of ``coordinator_address``, ``num_processes`` and ``process_id``.
    Calling it again in an initialized process does nothing.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    named = [k for k, v in given.items() if v is not None]
    if named and len(named) != 3:
        missing = [k for k in given if k not in named]
        raise DistributedError(
            f"explicit cluster settings need coordinator_address, num_processes and process_id "
            f"together; {missing} missing. Fix: give all three (e.g. --coordinator localhost:12355 "
            "--num-processes 2 --process-id 0), or none to let JAX detect the cluster."
        )
    if named and not 0 <= process_id < num_processes:  # type: ignore[operator]
        raise DistributedError(
            f"process_id {process_id} is outside 0..{num_processes - 1}"  # type: ignore[operator]
        )
    if is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = dict(initialization_timeout=timeout_s)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def is_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed as _distributed  # older JAX

    return _distributed.global_state.client is not None


def is_primary() -> bool:
    """Whether this process writes logs and prints (process 0)."""
    return jax.process_index() == 0
