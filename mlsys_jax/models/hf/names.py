"""Where each Hugging Face tensor lives in our parameters, and how its layout differs.

A Hugging Face Llama stores ``nn.Linear`` weights as (out, in) with heads flattened into the
out dim; ours keep (in, heads, head_dim) and stack the layers on a leading axis. Each mapping
says how to view the file's tensor (a split of its dims, in C order) and how to transpose that
view into ours; both directions, and reading any box of ours as a box of the file, follow from
those two facts. Both conventions rotate the two halves of each head (no permutation of q or
k is needed).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator

import numpy as np

from mlsys_jax.models.config import LlamaConfig

Reader = Callable[[str, tuple[slice, ...]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One tensor: ``ours = file.reshape(view).transpose(perm)``, where file dim ``j`` is made
    of ``groups[j]`` consecutive view dims; ``layered`` names a per-layer file tensor (``{i}``
    in ``name``) stacked on our leading axis."""

    name: str
    path: tuple[str, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    groups: tuple[int, ...]
    layered: bool = False

    def file_name(self, layer: int | None = None) -> str:
        return self.name.format(i=layer)

    @property
    def file_shape(self) -> tuple[int, ...]:
        """The tensor's shape in the file: the view's dims regrouped as the file keeps them."""
        return tuple(int(np.prod(self.view[a:b])) for a, b in self._spans())

    def _spans(self) -> list[tuple[int, int]]:
        bounds = np.cumsum((0, *self.groups))
        return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def to_ours(self, array: np.ndarray) -> np.ndarray:
        return array.reshape(self.view).transpose(self.perm)

    def to_file(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(np.argsort(self.perm)).reshape(self.file_shape)

    def read_box(self, box: tuple[slice, ...], layer: int | None, read: Reader) -> np.ndarray:
        """Our parameter's ``box`` (without the layers axis) from the file, reading only the
        rows of each file dim the box touches: a file dim made of several view dims (heads x
        head_dim) is read over whole inner dims and sliced after."""
        view_box = [slice(0, n) for n in self.view]
        for ours_dim, s in enumerate(box):
            view_box[self.perm[ours_dim]] = s
        file_box, block_shape, inner = [], [], []
        for a, b in self._spans():
            outer, rest = view_box[a], self.view[a + 1 : b]
            whole = int(np.prod(rest))
            file_box.append(slice(outer.start * whole, outer.stop * whole))
            block_shape += [outer.stop - outer.start, *rest]
            inner += [slice(None), *view_box[a + 1 : b]]
        block = read(self.file_name(layer), tuple(file_box)).reshape(block_shape)[tuple(inner)]
        return block.transpose(self.perm)


def mappings(cfg: LlamaConfig) -> list[Mapping]:
    """Every tensor of the config's checkpoint, in the order transformers writes them."""
    d, h, k, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size

    def per_layer(name: str, ours: str, view: tuple[int, ...], perm: tuple[int, ...], groups: tuple[int, ...]):
        return Mapping("model.layers.{i}." + name, ("layers", ours), view, perm, groups, layered=True)

    out = [Mapping("model.embed_tokens.weight", ("embed",), (v, d), (0, 1), (1, 1))]
    out += [
        per_layer("self_attn.q_proj.weight", "wq", (h, hd, d), (2, 0, 1), (2, 1)),
        per_layer("self_attn.k_proj.weight", "wk", (k, hd, d), (2, 0, 1), (2, 1)),
        per_layer("self_attn.v_proj.weight", "wv", (k, hd, d), (2, 0, 1), (2, 1)),
    ]
    if cfg.qkv_bias:
        out += [
            per_layer("self_attn.q_proj.bias", "bq", (h, hd), (0, 1), (2,)),
            per_layer("self_attn.k_proj.bias", "bk", (k, hd), (0, 1), (2,)),
            per_layer("self_attn.v_proj.bias", "bv", (k, hd), (0, 1), (2,)),
        ]
    out += [
        per_layer("self_attn.o_proj.weight", "wo", (d, h, hd), (1, 2, 0), (1, 2)),
        per_layer("mlp.gate_proj.weight", "w_gate", (f, d), (1, 0), (1, 1)),
        per_layer("mlp.up_proj.weight", "w_up", (f, d), (1, 0), (1, 1)),
        per_layer("mlp.down_proj.weight", "w_down", (d, f), (1, 0), (1, 1)),
        per_layer("input_layernorm.weight", "attn_norm", (d,), (0,), (1,)),
        per_layer("post_attention_layernorm.weight", "mlp_norm", (d,), (0,), (1,)),
        Mapping("model.norm.weight", ("final_norm",), (d,), (0,), (1,)),
    ]
    if not cfg.tie_embeddings:
        out.append(Mapping("lm_head.weight", ("head",), (v, d), (1, 0), (1, 1)))
    return out


def file_tensors(cfg: LlamaConfig) -> Iterator[tuple[str, Mapping, int | None]]:
    """(file name, mapping, layer) for every tensor the checkpoint holds."""
    for m in mappings(cfg):
        for layer in range(cfg.n_layers) if m.layered else (None,):
            yield m.file_name(layer), m, layer


def normalize(box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A device's index into an array of ``shape`` with every slice's start and stop filled in."""
    box = tuple(box) + (slice(None),) * (len(shape) - len(box))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape))
