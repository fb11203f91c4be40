"""Backends of one operation, and the choice among them.

Every operation (attention, rms_norm, ...) has a registry: an explicit table of its backends and
each platform's order of preference among them. ``implementation=None`` walks that order and takes the first backend that can serve
the arguments; each one that cannot says why, and the reasons travel with the choice so a user
can see them (``explain``). Naming a backend runs exactly that backend or raises its reason.
Pallas backends also run on CPU in interpret mode when asked for by name, which is how they are
tested without an accelerator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from mlsys_jax.kernels.blocks import default_for

# Names that pick among several backends rather than naming one.
AUTO = None
ANY_PALLAS = "pallas"


class KernelUnavailable(ValueError):
    """No backend of an operation can serve the given arguments on this platform."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to run an operation.

    ``platforms`` are where it compiles natively; ``interpretable`` backends also run on CPU
    through Pallas's interpreter. ``check(**args)`` returns why it cannot serve the arguments,
    or None. ``run`` is the differentiable function; it receives ``interpret=`` when
    ``interpretable``. A backend with tiles names its config type (``blocks``), its defaults per
    device kind (``defaults``, see ``blocks.default_for``) and ``candidates(platform)``, the
    configs autotuning tries there.
    """

    name: str
    platforms: tuple[str, ...]
    run: Callable[..., Any]
    check: Callable[..., str | None] = lambda **_: None
    interpretable: bool = False
    blocks: type | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    candidates: Callable[[str], Sequence[Any]] | None = None

    @property
    def is_pallas(self) -> bool:
        return self.name.startswith("pallas")

    def default_blocks(self, device: str | None = None) -> Any:
        """This backend's block config for a device kind (None for a backend without tiles)."""
        if self.blocks is None:
            return None
        return default_for(self.defaults, self.blocks, device)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The backend dispatch picked, whether it runs interpreted, and why the others were passed."""

    backend: Backend
    interpret: bool
    passed_over: tuple[tuple[str, str], ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.backend.interpretable:
            kwargs["interpret"] = self.interpret
        return self.backend.run(*args, **kwargs)

    def describe(self) -> str:
        mode = " (interpret mode)" if self.interpret else ""
        lines = [f"{self.backend.name}{mode}"]
        lines += [f"  passed over {name}: {why}" for name, why in self.passed_over]
        return "\n".join(lines)


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu' for JAX's default backend."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


class Registry:
    """The backends of one operation and each platform's order of preference.

    Built from an explicit table of backends; every name in a platform's order must be one of
    them. ``register`` adds a backend afterwards (a user's own, or a test's).
    """

    def __init__(self, op: str, order: dict[str, tuple[str, ...]], backends: Iterable[Backend] = ()):
        self.op = op
        self.order = order
        self.backends: dict[str, Backend] = {}
        for backend in backends:
            self.register(backend)
        if self.backends:
            self.check_order()

    def check_order(self) -> None:
        """Refuse a preference order that names a backend the table does not hold."""
        for platform, names in self.order.items():
            missing = [n for n in names if n not in self.backends]
            if missing:
                raise ValueError(
                    f"{self.op}: the {platform} order names {missing}, which are not "
                    f"among its backends {list(self.backends)}"
                )

    def register(self, backend: Backend) -> Backend:
        self.backends[backend.name] = backend
        return backend

    def names(self) -> tuple[str, ...]:
        return tuple(self.backends)

    def _why_not(self, backend: Backend, platform: str, explicit: bool, args: dict) -> tuple[str | None, bool]:
        interpret = False
        if platform not in backend.platforms:
            if backend.interpretable and platform == "cpu" and explicit:
                interpret = True
            else:
                where = ", ".join(backend.platforms)
                extra = " (on CPU it runs in interpret mode only when named)" if backend.interpretable else ""
                return f"runs on {where}, not {platform}{extra}", False
        return backend.check(**args), interpret

    def choose(self, implementation: str | None, platform: str | None = None, **args: Any) -> Choice:
        """The backend for these arguments; ``args`` are what ``check`` functions read."""
        platform = platform or current_platform()
        if implementation not in (AUTO, ANY_PALLAS) and implementation not in self.backends:
            raise KernelUnavailable(
                f"{self.op}: unknown implementation {implementation!r}. Fix: use one of "
                f"{[None, ANY_PALLAS, *self.backends]}."
            )
        if implementation not in (AUTO, ANY_PALLAS):
            backend = self.backends[implementation]
            why, interpret = self._why_not(backend, platform, True, args)
            if why:
                raise KernelUnavailable(f"{self.op}: implementation {implementation!r} cannot run here: {why}.")
            return Choice(backend, interpret)

        if implementation == ANY_PALLAS:
            candidates = [b for b in self.backends.values() if b.is_pallas]
            native = [b for b in candidates if platform in b.platforms]
            # Off-accelerator, "pallas" means the interpreted kernels: slow, but exact.
            candidates = native or [b for b in candidates if b.interpretable]
            explicit = not native
        else:
            candidates = [self.backends[n] for n in self.order.get(platform, ()) if n in self.backends]
            explicit = False
        passed: list[tuple[str, str]] = []
        for backend in candidates:
            why, interpret = self._why_not(backend, platform, explicit, args)
            if why is None:
                return Choice(backend, interpret, tuple(passed))
            passed.append((backend.name, why))
        reasons = "; ".join(f"{n}: {w}" for n, w in passed) or "no backend is registered"
        raise KernelUnavailable(
            f"{self.op}: no {'Pallas ' if implementation == ANY_PALLAS else ''}backend can serve "
            f"these arguments on {platform} ({reasons}). Fix: use implementation='xla'."
        )
