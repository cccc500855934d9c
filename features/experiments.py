"""A/B experiments: definitions, sticky assignment and the Redis-backed registry.

An :class:`Experiment` splits shoppers between named variants (the first one is
the control) by traffic weight. :func:`assign` is deterministic and sticky: a
user's variant is a pure function of the experiment's ``salt``, its variant
weights and the ``user_id``, computed from SHA-256 (never Python's ``hash``,
which is randomised per process). The same user therefore lands in the same
variant in every worker, API process, report and liftrec version, and
experiments with different salts split users independently of each other.

:func:`sample_size_per_variant` and :func:`minimum_detectable_effect` size
an experiment before it starts (normal approximation, two-sided test).

Bucketing: ``u = first 8 bytes of sha256(salt + "\\x1f" + user_id)`` read as a
big-endian integer and divided by 2**64, so ``u`` is uniform in [0, 1). The
variants own consecutive slices of [0, 1) in declaration order, each as wide
as its normalised weight.

Definitions live in Redis (see :mod:`features.keys`, ``experiment:*``) as
orjson in one hash, so the API and the stream workers read every experiment in
one round trip; changes are announced on a pub/sub channel. The module is free
of Faust and FastAPI: :class:`ExperimentStore` takes a sync ``redis.Redis``
(the CLI), :class:`AsyncExperimentStore` a ``redis.asyncio.Redis`` (API and
workers, read-only).
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Any, Literal

import orjson
import redis
import redis.asyncio as aioredis

from features.errors import LiftrecError
from features.keys import KeySchema

__all__ = [
    "STATUSES",
    "AsyncExperimentStore",
    "Experiment",
    "ExperimentExists",
    "ExperimentStore",
    "UnknownExperiment",
    "Variant",
    "assign",
    "assign_many",
    "bucket",
    "decode_experiment",
    "encode_experiment",
    "minimum_detectable_effect",
    "parse_variants",
    "sample_size_per_variant",
    "z_alpha_power",
]

Status = Literal["running", "stopped"]
STATUSES: tuple[str, ...] = ("running", "stopped")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TWO_64 = float(2**64)


class UnknownExperiment(LiftrecError):
    """No experiment of that name is stored."""

    http_status = 404


class ExperimentExists(LiftrecError):
    """An experiment of that name is already stored (names are never reused)."""

    http_status = 409


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    """One arm of an experiment: a name and a relative traffic weight (> 0)."""

    name: str
    weight: float


@dataclasses.dataclass(frozen=True, slots=True)
class Experiment:
    """An A/B experiment definition.

    Attributes
    ----------
    name : str
        1-64 characters of letters, digits, ``_``, ``.``, ``-``; starts with a letter or digit.
    variants : tuple of Variant
        At least two, unique names; the first is the control.
    salt : str
        Seed of the assignment hash (default: the name). Two experiments with
        different salts split users independently.
    start_ts : int
        Epoch ms from which events count for the experiment.
    stop_ts : int or None
        Epoch ms at which it stopped (events from then on are ignored); ``None`` while open-ended.
    status : {"running", "stopped"}
        A stopped experiment always has ``stop_ts``.
    description : str
        Free text for the analysts (hypothesis, owner...).

    Raises
    ------
    ValueError
        Any field that breaks the rules above, with what was expected.
    """

    name: str
    variants: tuple[Variant, ...]
    salt: str
    start_ts: int
    stop_ts: int | None = None
    status: Status = "running"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"experiment name must be 1-64 characters of letters, digits, '_', '.', '-' "
                             f"starting with a letter or digit; got {self.name!r}")
        if len(self.variants) < 2:
            raise ValueError(f"an experiment needs at least two variants (the first is the control); "
                             f"got {len(self.variants)}")
        names = [v.name for v in self.variants]
        for v in self.variants:
            if not isinstance(v.name, str) or not _NAME_RE.match(v.name):
                raise ValueError(f"variant name must be 1-64 characters of letters, digits, '_', '.', '-'; "
                                 f"got {v.name!r}")
            if isinstance(v.weight, bool) or not isinstance(v.weight, int | float) \
                    or not math.isfinite(v.weight) or v.weight <= 0:
                raise ValueError(f"variant {v.name!r}: weight must be a finite number > 0, got {v.weight!r}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        if not isinstance(self.salt, str) or not self.salt:
            raise ValueError(f"salt must be a non-empty string, got {self.salt!r}")
        if isinstance(self.start_ts, bool) or not isinstance(self.start_ts, int) or self.start_ts < 0:
            raise ValueError(f"start_ts must be epoch milliseconds (int >= 0), got {self.start_ts!r}")
        if self.stop_ts is not None and (isinstance(self.stop_ts, bool) or not isinstance(self.stop_ts, int)
                                         or self.stop_ts < self.start_ts):
            raise ValueError(f"stop_ts must be epoch milliseconds >= start_ts ({self.start_ts}), "
                             f"got {self.stop_ts!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {self.status!r}")
        if self.status == "stopped" and self.stop_ts is None:
            raise ValueError("a stopped experiment must carry stop_ts")

    @classmethod
    def create(cls, name: str, variants: Sequence[Variant] | str, *, salt: str | None = None,
               start_ts: int, stop_ts: int | None = None, description: str = "") -> Experiment:
        """A running experiment; ``variants`` may be a spec like ``"control:50,liftrec:50"``.

        See Also
        --------
        parse_variants
        """
        vs = parse_variants(variants) if isinstance(variants, str) else tuple(variants)
        return cls(name=name, variants=vs, salt=salt or name, start_ts=start_ts, stop_ts=stop_ts,
                   description=description)

    @property
    def control(self) -> str:
        """Name of the control variant (the first one)."""
        return self.variants[0].name

    @property
    def variant_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    def shares(self) -> dict[str, float]:
        """Expected share of traffic per variant (weights normalised to sum 1)."""
        total = math.fsum(v.weight for v in self.variants)
        return {v.name: v.weight / total for v in self.variants}

    def is_active(self, now_ms: int) -> bool:
        """Running, started, and not past a scheduled ``stop_ts``."""
        return (self.status == "running" and self.start_ts <= now_ms
                and (self.stop_ts is None or now_ms < self.stop_ts))

    def in_window(self, ts: int) -> bool:
        """Whether an event at ``ts`` falls inside ``[start_ts, stop_ts)``."""
        return self.start_ts <= ts and (self.stop_ts is None or ts < self.stop_ts)

    def stopped(self, at_ms: int) -> Experiment:
        """A stopped copy; events from ``at_ms`` on are outside the experiment."""
        stop = at_ms if self.stop_ts is None else min(self.stop_ts, at_ms)
        return dataclasses.replace(self, status="stopped", stop_ts=max(stop, self.start_ts))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the stored and the ``show --json`` format)."""
        return {"name": self.name, "variants": [{"name": v.name, "weight": v.weight} for v in self.variants],
                "salt": self.salt, "start_ts": self.start_ts, "stop_ts": self.stop_ts,
                "status": self.status, "description": self.description}

    @classmethod
    def from_dict(cls, data: Any) -> Experiment:
        """Inverse of :meth:`to_dict`; ``ValueError`` saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"an experiment must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("name", "variants", "salt", "start_ts") if k not in data]
        if missing:
            raise ValueError(f"experiment definition lacks {', '.join(missing)}")
        raw = data["variants"]
        if not isinstance(raw, list) or not all(isinstance(v, dict) and {"name", "weight"} <= v.keys()
                                                for v in raw):
            raise ValueError("variants must be a list of {\"name\": ..., \"weight\": ...} objects")
        return cls(name=data["name"], variants=tuple(Variant(v["name"], v["weight"]) for v in raw),
                   salt=data["salt"], start_ts=data["start_ts"], stop_ts=data.get("stop_ts"),
                   status=data.get("status", "running"), description=data.get("description", ""))


def parse_variants(spec: str) -> tuple[Variant, ...]:
    """Parse ``"control:50,liftrec:50"`` (``name:weight`` pairs, comma separated).

    A bare name gets weight 1, so ``"a,b,c"`` is an even three-way split.

    Raises
    ------
    ValueError
        Empty spec, empty name or a weight that is not a positive number.
    """
    out: list[Variant] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise ValueError(f"variant spec {spec!r} has an empty entry; expected name:weight,name:weight")
        name, sep, weight = part.partition(":")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"variant {name!r}: weight {weight!r} is not a number; "
                             f"expected name:weight such as control:50") from None
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"variant {name!r}: weight must be a finite number > 0, got {weight!r}")
        out.append(Variant(name.strip(), int(w) if w.is_integer() else w))
    return tuple(out)


def bucket(salt: str, user_id: str) -> float:
    """The user's position in [0, 1) for ``salt`` (SHA-256 based, stable everywhere)."""
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _TWO_64


def assign(experiment: Experiment, user_id: str) -> str:
    """The variant of ``user_id`` in ``experiment`` (deterministic and sticky).

    Parameters
    ----------
    experiment : Experiment
    user_id : str

    Returns
    -------
    str
        A variant name. The result does not depend on the status or window:
        callers decide whether a stopped experiment still applies.

    Examples
    --------
    >>> exp = Experiment.create("recs-v2", "control:50,liftrec:50", start_ts=0)
    >>> assign(exp, "u1") == assign(exp, "u1")
    True
    """
    u = bucket(experiment.salt, user_id)
    total = math.fsum(v.weight for v in experiment.variants)
    edge = 0.0
    for v in experiment.variants[:-1]:
        edge += v.weight / total
        if u < edge:
            return v.name
    return experiment.variants[-1].name


def assign_many(experiment: Experiment, user_ids: Iterable[str]) -> list[str]:
    """:func:`assign` for many users."""
    return [assign(experiment, u) for u in user_ids]


def encode_experiment(experiment: Experiment) -> bytes:
    """The stored value of one experiment (orjson)."""
    return orjson.dumps(experiment.to_dict())


def decode_experiment(raw: bytes | str) -> Experiment:
    """Inverse of :func:`encode_experiment`; ``ValueError`` on a corrupt value."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"stored experiment is not valid JSON: {err}") from None
    return Experiment.from_dict(data)


def _decode_all(raw: dict[bytes, bytes]) -> list[Experiment]:
    exps = [decode_experiment(v) for v in raw.values()]
    return sorted(exps, key=lambda e: (e.start_ts, e.name))


class ExperimentStore:
    """Experiments in Redis (sync client; used by the CLI).

    Parameters
    ----------
    client : redis.Redis
    keys : KeySchema

    Examples
    --------
    >>> store = ExperimentStore(redis.Redis.from_url(url), KeySchema("liftrec"))  # doctest: +SKIP
    >>> store.create(Experiment.create("recs-v2", "control:50,liftrec:50", start_ts=now))  # doctest: +SKIP
    """

    __slots__ = ("client", "keys")

    def __init__(self, client: redis.Redis, keys: KeySchema) -> None:
        self.client = client
        self.keys = keys

    def create(self, experiment: Experiment) -> Experiment:
        """Store a new experiment; :class:`ExperimentExists` if the name is taken."""
        if not self.client.hsetnx(self.keys.experiments(), experiment.name, encode_experiment(experiment)):
            raise ExperimentExists(f"experiment {experiment.name!r} already exists; pick another name "
                                   "(names are never reused, so old reports stay reproducible)")
        self.client.publish(self.keys.experiment_announce(), f"create {experiment.name}")
        return experiment

    def get(self, name: str) -> Experiment:
        """One experiment; :class:`UnknownExperiment` when absent."""
        raw = self.client.hget(self.keys.experiments(), name)
        if raw is None:
            raise UnknownExperiment(f"no experiment named {name!r}; `liftrec experiments list` shows them")
        return decode_experiment(raw)

    def list(self) -> list[Experiment]:
        """Every stored experiment, oldest start first."""
        return _decode_all(self.client.hgetall(self.keys.experiments()))

    def active(self, now_ms: int) -> builtins.list[Experiment]:
        """The experiments that apply at ``now_ms``."""
        return [e for e in self.list() if e.is_active(now_ms)]

    def stop(self, name: str, *, at_ms: int) -> Experiment:
        """Mark an experiment stopped at ``at_ms`` (atomic read-modify-write).

        Stopping a stopped experiment returns it unchanged.
        """
        key = self.keys.experiments()
        result: builtins.list[Experiment] = []

        def update(pipe: Any) -> None:
            raw = pipe.hget(key, name)
            if raw is None:
                raise UnknownExperiment(f"no experiment named {name!r}; `liftrec experiments list` shows them")
            exp = decode_experiment(raw)
            result[:] = [exp if exp.status == "stopped" else exp.stopped(at_ms)]
            pipe.multi()
            pipe.hset(key, name, encode_experiment(result[0]))

        self.client.transaction(update, key)
        self.client.publish(self.keys.experiment_announce(), f"stop {name}")
        return result[0]


class AsyncExperimentStore:
    """Read-only view of the stored experiments for asyncio code (API, workers).

    Parameters
    ----------
    client : redis.asyncio.Redis
    keys : KeySchema
    """

    __slots__ = ("client", "keys")

    def __init__(self, client: aioredis.Redis, keys: KeySchema) -> None:
        self.client = client
        self.keys = keys

    async def get(self, name: str) -> Experiment:
        """One experiment; :class:`UnknownExperiment` when absent."""
        raw = await self.client.hget(self.keys.experiments(), name)
        if raw is None:
            raise UnknownExperiment(f"no experiment named {name!r}")
        return decode_experiment(raw)

    async def list(self) -> list[Experiment]:
        """Every stored experiment, oldest start first."""
        return _decode_all(await self.client.hgetall(self.keys.experiments()))

    async def active(self, now_ms: int) -> builtins.list[Experiment]:
        """The experiments that apply at ``now_ms``."""
        return [e for e in await self.list() if e.is_active(now_ms)]


# -- planning ----------------------------------------------------------------------------------


def z_alpha_power(alpha: float, power: float) -> float:
    """``z_{1-alpha/2} + z_power`` of the standard normal (two-sided test)."""
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be in (0, 1); got alpha={alpha}, power={power}")
    nd = NormalDist()
    return nd.inv_cdf(1 - alpha / 2) + nd.inv_cdf(power)


def sample_size_per_variant(baseline: float, mde: float, *, std: float | None = None, alpha: float = 0.05,
                            power: float = 0.8) -> int:
    """Users needed in each of two equal arms to detect a relative change ``mde``.

    Parameters
    ----------
    baseline : float
        The control's metric: a rate in (0, 1) (conversion) when ``std`` is
        None, else a mean (revenue per visitor) whose per-user standard deviation is ``std``.
    mde : float
        Minimum detectable effect, relative (0.05 = +5 %).
    std : float, optional
    alpha : float, optional
        Two-sided significance level.
    power : float, optional

    Returns
    -------
    int
        ``ceil((z_{1-alpha/2} + z_power)^2 (var_control + var_treatment) / delta^2)``.
    """
    z = z_alpha_power(alpha, power)
    if mde <= 0:
        raise ValueError(f"mde must be a relative change > 0, got {mde}")
    if std is None:
        p2 = baseline * (1 + mde)
        if not 0 < baseline < 1 or p2 >= 1:
            raise ValueError(f"a rate baseline must be in (0, 1) and stay below 1 after the change; got "
                             f"{baseline} -> {p2}")
        var = baseline * (1 - baseline) + p2 * (1 - p2)
        return math.ceil(z * z * var / (p2 - baseline) ** 2)
    if baseline <= 0 or std <= 0:
        raise ValueError(f"baseline mean and std must be > 0, got {baseline} and {std}")
    return math.ceil(z * z * 2 * std * std / (baseline * mde) ** 2)


def minimum_detectable_effect(baseline: float, n_per_variant: int, *, std: float | None = None,
                              alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest relative change two arms of ``n_per_variant`` users detect (inverse of
    :func:`sample_size_per_variant`). Returns ``inf`` when no change below 100 %/the rate cap is detectable."""
    z = z_alpha_power(alpha, power)
    if n_per_variant < 2:
        raise ValueError(f"n_per_variant must be >= 2, got {n_per_variant}")
    if std is not None:
        if baseline <= 0 or std <= 0:
            raise ValueError(f"baseline mean and std must be > 0, got {baseline} and {std}")
        return z * std * math.sqrt(2 / n_per_variant) / baseline
    if not 0 < baseline < 1:
        raise ValueError(f"a rate baseline must be in (0, 1), got {baseline}")

    def needed(m: float) -> float:
        p2 = baseline * (1 + m)
        return z * z * (baseline * (1 - baseline) + p2 * (1 - p2)) / (p2 - baseline) ** 2

    lo, hi = 1e-9, (1 - 1e-12) / baseline - 1
    if needed(hi) > n_per_variant:
        return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if needed(mid) > n_per_variant else (lo, mid)
    return hi
