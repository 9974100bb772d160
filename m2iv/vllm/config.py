"""The serving configuration (``additional_config["m2iv"]``) and the per-request choice
(``SamplingParams.extra_args["m2iv"]``), parsed and checked without importing vLLM.

Server side, once per engine::

    LLM(model, additional_config={"m2iv": {
        "vectors": {"formal": "formal.safetensors",        # a file written by M2IV.save
                    "vqa": {"library": "vqa:2"}},           # a VLibrary entry (name[:version])
        "library": "~/m2iv-lib",        # VLibrary for library entries (default: $M2IV_LIBRARY...)
        "prefix_caching": "salt",       # "salt" (default) or "off" for steered requests
        "backend": "auto",              # m2iv_kernels backend of the steering ops
    }})

A file holding a bank of N vector sets (``M2IV.stack``) under the name ``t`` serves the names
``t/0 .. t/N-1``. Bank slot 0 is "no steering"; the names take slots ``1..`` in the order given.

Per request::

    SamplingParams(extra_args={"m2iv": {"vectors": "formal", "strength": 0.8}})
    SamplingParams(extra_args={"m2iv": "formal", "m2iv_strength": 0.8})   # flat form

The flat form is what the OpenAI-compatible server can carry (its ``vllm_xargs`` request field
holds flat values only): ``{"vllm_xargs": {"m2iv": "formal", "m2iv_strength": 0.8}}``.

``strength`` (default 1) multiplies every gate, as ``patch_model(strength=)`` does; no
``"m2iv"`` key, ``"vectors": None`` or strength 0 mean unsteered.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from ..errors import M2IVError

__all__ = ["ServingConfig", "Steering", "ServingConfigError", "SteeringRequestError",
           "CONFIG_KEY", "REQUEST_KEY", "parse_config", "parse_request", "cache_salt"]

CONFIG_KEY = "m2iv"  # in additional_config
REQUEST_KEY = "m2iv"  # in SamplingParams.extra_args
STRENGTH_KEY = "m2iv_strength"  # the flat form's strength
PREFIX_POLICIES = ("salt", "off")
_CONFIG_KEYS = ("vectors", "library", "prefix_caching", "backend")
_REQUEST_KEYS = ("vectors", "strength")


class ServingConfigError(M2IVError, ValueError):
    """``additional_config["m2iv"]`` is malformed, or names vectors that cannot be loaded or do
    not fit the served model."""


class SteeringRequestError(M2IVError, ValueError):
    """A request's ``extra_args["m2iv"]`` is malformed or names unknown vectors."""


@dataclass(frozen=True)
class Source:
    """Where one configured name's vectors come from."""

    name: str
    file: str | None = None  # a safetensors file written by M2IV.save
    library_ref: str | None = None  # "name[:version]" in the VLibrary
    bank_row: int | None = None  # the row of a bank file this name serves


@dataclass(frozen=True)
class ServingConfig:
    """The parsed ``additional_config["m2iv"]``: names in bank-slot order (slot = index + 1)."""

    sources: tuple[Source, ...]
    library: str | None
    prefix_caching: str
    backend: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    @property
    def bank_size(self) -> int:
        """Slots in the bank: one per name, plus slot 0 (no steering)."""
        return len(self.sources) + 1

    def slot(self, name: str) -> int:
        return self._slots[name]

    @property
    def _slots(self) -> dict[str, int]:
        cached = self.__dict__.get("_slot_map")
        if cached is None:
            cached = {s.name: i + 1 for i, s in enumerate(self.sources)}
            object.__setattr__(self, "_slot_map", cached)
        return cached


@dataclass(frozen=True)
class Steering:
    """One request's steering: bank slot (0 = none), strength, and the configured name."""

    slot: int
    strength: float
    name: str | None

    @property
    def active(self) -> bool:
        return self.slot != 0 and self.strength != 0.0


UNSTEERED = Steering(0, 0.0, None)


def _bank_rows(path: str) -> int | None:
    """N for a bank file, None for a single vector set (reads the header only)."""
    from ..vectors import M2IV

    try:
        meta = M2IV.read_meta(path)
    except (OSError, ValueError) as err:
        raise ServingConfigError(f"m2iv vectors file {path!r}: {err}") from None
    bank = meta.get("bank")
    return len(bank) if isinstance(bank, list) else None


def parse_config(raw: Any) -> ServingConfig | None:
    """``additional_config`` (the whole dict) -> :class:`ServingConfig`, or None when it has no
    ``"m2iv"`` entry (the plugin then stays inert).

    Raises:
        ServingConfigError: unknown keys, bad values, missing files (each named).
    """
    if not isinstance(raw, dict) or CONFIG_KEY not in raw:
        return None
    cfg = raw[CONFIG_KEY]
    if not isinstance(cfg, dict):
        raise ServingConfigError(f'additional_config["m2iv"] must be a dict; got {cfg!r}')
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ServingConfigError(f'additional_config["m2iv"]: unknown key(s) {unknown}; known: '
                                 f"{list(_CONFIG_KEYS)}")
    vectors = cfg.get("vectors")
    if not isinstance(vectors, dict) or not vectors:
        raise ServingConfigError('additional_config["m2iv"]["vectors"] must map names to files '
                                 'or {"library": "name[:version]"}, e.g. {"formal": '
                                 '"formal.safetensors"}')
    library = cfg.get("library")
    if library is not None and not isinstance(library, str):
        raise ServingConfigError(f'additional_config["m2iv"]["library"] must be a path; got '
                                 f"{library!r}")
    policy = cfg.get("prefix_caching", "salt")
    if policy not in PREFIX_POLICIES:
        raise ServingConfigError(f'additional_config["m2iv"]["prefix_caching"] must be one of '
                                 f"{list(PREFIX_POLICIES)}; got {policy!r}")
    backend = cfg.get("backend", "auto")
    if backend not in ("auto", "triton", "ext", "torch"):
        raise ServingConfigError(f'additional_config["m2iv"]["backend"] must be "auto", '
                                 f'"triton", "ext" or "torch"; got {backend!r}')
    sources: list[Source] = []
    for name, spec in vectors.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ServingConfigError(f"m2iv vector names must be non-empty strings without '/'; "
                                     f"got {name!r}")
        if isinstance(spec, str):
            path = os.path.abspath(os.path.expanduser(spec))
            if not os.path.isfile(path):
                raise ServingConfigError(f"m2iv vectors {name!r}: no file at {spec!r}")
            rows = _bank_rows(path)
            if rows is None:
                sources.append(Source(name, file=path))
            else:
                sources += [Source(f"{name}/{i}", file=path, bank_row=i) for i in range(rows)]
        elif isinstance(spec, dict) and set(spec) == {"library"} and isinstance(
                spec["library"], str):
            sources.append(Source(name, library_ref=spec["library"]))
        else:
            raise ServingConfigError(f"m2iv vectors {name!r}: expected a file path or "
                                     f'{{"library": "name[:version]"}}; got {spec!r}')
    return ServingConfig(tuple(sources), library, policy, backend)


def parse_request(extra_args: Any, config: ServingConfig) -> Steering:
    """A request's ``extra_args`` -> its :class:`Steering`.

    Raises:
        SteeringRequestError: not a dict, unknown keys, an unknown vectors name (the known ones
            are listed), a strength that is not a finite number.
    """
    if not extra_args or (REQUEST_KEY not in extra_args and STRENGTH_KEY not in extra_args):
        return UNSTEERED
    if not isinstance(extra_args, dict):
        raise SteeringRequestError(f"extra_args must be a dict; got {extra_args!r}")
    args = extra_args.get(REQUEST_KEY)
    if STRENGTH_KEY in extra_args:  # the flat form
        if not isinstance(args, str):
            raise SteeringRequestError(f'extra_args["{STRENGTH_KEY}"] goes with a vectors name '
                                       f'in extra_args["m2iv"]; got "m2iv": {args!r}')
        args = {"vectors": args, "strength": extra_args[STRENGTH_KEY]}
    if args is None:
        return UNSTEERED
    if isinstance(args, str):  # extra_args={"m2iv": "formal"}
        args = {"vectors": args}
    if not isinstance(args, dict):
        raise SteeringRequestError(f'extra_args["m2iv"] must be {{"vectors": NAME, "strength": '
                                   f"S}} or a vectors name; got {args!r}")
    unknown = sorted(set(args) - set(_REQUEST_KEYS))
    if unknown:
        raise SteeringRequestError(f'extra_args["m2iv"]: unknown key(s) {unknown}; known: '
                                   f"{list(_REQUEST_KEYS)}")
    name = args.get("vectors")
    strength = args.get("strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise SteeringRequestError(f'extra_args["m2iv"]["strength"] must be a number; got '
                                   f"{strength!r}")
    strength = float(strength)
    if not math.isfinite(strength):
        raise SteeringRequestError(f'extra_args["m2iv"]["strength"] must be finite; got '
                                   f"{strength}")
    if name is None:
        return UNSTEERED
    if not isinstance(name, str) or name not in config._slots:
        known = ", ".join(repr(n) for n in config.names[:20])
        more = f" (and {len(config.names) - 20} more)" if len(config.names) > 20 else ""
        raise SteeringRequestError(f'extra_args["m2iv"]["vectors"] = {name!r} is not served '
                                   f"here; this server has {known}{more}")
    if strength == 0.0:
        return UNSTEERED
    return Steering(config.slot(name), strength, name)


def cache_salt(steering: Steering, config: ServingConfig, user_salt: str | None,
               request_id: str) -> str | None:
    """The prefix-cache salt of a request: unchanged when unsteered; otherwise the steering
    (``"salt"``: requests with the same vectors and strength share cached blocks) or the
    request itself (``"off"``: its blocks are never reused, by it or anyone else)."""
    if not steering.active:
        return user_salt
    if config.prefix_caching == "off":
        key = {"m2iv-request": request_id}
    else:
        src = config.sources[steering.slot - 1]
        key = {"m2iv": [src.name, src.file, src.library_ref, src.bank_row, steering.strength]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return f"{user_salt}|m2iv:{digest}" if user_salt else f"m2iv:{digest}"
