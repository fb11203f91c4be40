"""mlsys-jax: run pure-function JAX models across a device mesh, and see the plan first.

The functional API in one place: meshes (``make_mesh``), parameter specs (``ParamSpec``),
plans (``Plan``, ``rules``) and, in ``mlsys_jax.train``, the train step.
"""

from mlsys_jax._layout import mount_source_subpackages as _mount

_mount(__name__, __path__[0])

from mlsys_jax.mesh import MeshError, make_mesh, simulate_cpu_devices
from mlsys_jax.meshes import MeshPreset, load_preset, preset_names
from mlsys_jax.parallel import Placement, Plan, PlanError, Rules, fit_preset, rules
from mlsys_jax.params import ParamSpec, count_params, init_params

__version__ = "0.1.0"

__all__ = [
    "MeshError",
    "MeshPreset",
    "ParamSpec",
    "Placement",
    "Plan",
    "PlanError",
    "Rules",
    "count_params",
    "fit_preset",
    "init_params",
    "load_preset",
    "make_mesh",
    "preset_names",
    "rules",
    "simulate_cpu_devices",
]
