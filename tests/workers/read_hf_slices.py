"""One process of a job that reads a Hugging Face folder into an fsdp_tp plan over every device
of the job, then writes what it read and whether its shards hold the right values (JSON)."""

from __future__ import annotations

import json
import sys

import numpy as np

from mlsys_jax import distributed
from mlsys_jax.mesh import simulate_cpu_devices


def main(folder: str, port: str, process: str, out: str) -> None:
    simulate_cpu_devices(4, check=False)
    distributed.join(None, f"localhost:{port}", 2, int(process))
    import jax
    from safetensors.numpy import load_file

    from mlsys_jax.mesh import make_mesh
    from mlsys_jax.models import hf, llama
    from mlsys_jax.models.hf.checkpoint import by_path
    from mlsys_jax.models.hf.names import normalize
    from mlsys_jax.parallel import Plan, rules
    from mlsys_jax.params import spec_leaves

    ckpt = hf.open_checkpoint(folder, dtype="float32")
    model = llama.language_model(ckpt.config)
    plan = Plan(make_mesh({"fsdp": 4, "tensor": 2}), rules("fsdp_tp"))
    params = hf.load_params(ckpt, model.specs, plan.param_shardings(model.specs))
    whole = {}
    for path in sorted({str(p) for p in ckpt.tensors.files.values()}):
        whole.update(load_file(path))  # the test's own full read, to check the values against
    table = by_path(ckpt.config)
    leaves = dict(zip([p for p, _ in spec_leaves(model.specs)], jax.tree_util.tree_leaves(params)))
    distinct, correct = 0, True
    for path, array in leaves.items():
        m = table[path]
        ours = (
            np.stack([m.to_ours(whole[m.file_name(i)]) for i in range(ckpt.config.n_layers)])
            if m.layered
            else m.to_ours(whole[m.name])
        )
        seen = set()
        for shard in array.addressable_shards:
            key = tuple((s.start, s.stop) for s in normalize(shard.index, array.shape))
            correct &= bool(np.array_equal(np.asarray(shard.data), ours[shard.index]))
            if key not in seen:
                seen.add(key)
                distinct += int(np.asarray(shard.data).nbytes)
    report = {
        "process": int(process),
        "bytes_read": ckpt.tensors.reads.nbytes,
        "distinct_local_bytes": distinct,
        "file_bytes": int(sum(v.nbytes for v in whole.values())),
        "largest_read_fraction": max(
            float(np.prod([s.stop - s.start for s in box]) / np.prod(ckpt.tensors.shapes[name]))
            for name, box in ckpt.tensors.reads.boxes
        ),
        "correct": correct,
    }
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
