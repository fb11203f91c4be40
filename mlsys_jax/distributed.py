"""Join several processes into one JAX job: a cluster launcher's job detected from its
environment (SLURM, Open MPI, TPU pods, Kubernetes) or an explicit coordinator.

On CPU the processes exchange collectives over gloo, which is how multi-host code runs on one
machine: ``initialize("localhost:12355", num_processes=2, process_id=i)`` in each process, or
the same command in each process under a launcher's environment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

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
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
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
    kwargs: dict[str, Any] = {"initialization_timeout": timeout_s}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The job this process belongs to: who detected it, how many processes, which one this is."""

    detector: str
    num_processes: int
    process_id: int

    def describe(self, local_devices: int) -> str:
        return (
            f"cluster: {self.detector}, processes: {self.num_processes}, this process: "
            f"{self.process_id}, local devices: {local_devices}"
        )


#: What JAX's detectors are called in messages.
DETECTOR_NAMES = {
    "SlurmCluster": "SLURM",
    "OmpiCluster": "Open MPI",
    "GkeTpuCluster": "TPU (GKE)",
    "GceTpuCluster": "TPU (GCE)",
    "K8sCluster": "Kubernetes",
    "Mpi4pyCluster": "MPI (mpi4py)",
}


def detect_cluster() -> Cluster | None:
    """The launcher's job this process was started in, by JAX's own detectors (those that need no
    opt-in), or None. Reads the environment only; JAX's backend is not started."""
    try:
        from jax._src import clusters  # JAX's detectors: not public API, so guarded
    except ImportError:
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False) or not env.is_env_present():
            continue
        try:
            count, index = int(env.get_process_count()), int(env.get_process_id())
        except (KeyError, ValueError, RuntimeError) as err:
            raise DistributedError(
                f"a {DETECTOR_NAMES.get(env.__name__, env.__name__)} job was detected but its "
                f"environment does not say how many processes there are or which one this is ({err}). "
                "Fix: start the processes through the launcher (e.g. srun), or pass --cluster off."
            ) from None
        return Cluster(DETECTOR_NAMES.get(env.__name__, env.__name__), count, index)
    return None


def join(
    cluster: Cluster | None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Cluster | None:
    """Join the job: the explicit settings when given, else a detected cluster of more than one
    process (JAX reads the coordinator from the launcher's environment). Returns what was joined."""
    if coordinator_address or num_processes or process_id is not None:
        initialize(coordinator_address, num_processes, process_id)
        return Cluster("explicit settings", int(num_processes or 1), int(process_id or 0))
    if cluster is None or cluster.num_processes < 2:
        return cluster
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not is_initialized():
        jax.distributed.initialize(initialization_timeout=300)
    return cluster


def is_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed as _distributed  # older JAX

    return _distributed.global_state.client is not None


def is_primary() -> bool:
    """Whether this process writes logs and prints (process 0)."""
    return jax.process_index() == 0
