"""The model registry: a directory of bundles with an atomically switched ``CURRENT``.

Layout::

    <registry>/
      CURRENT                 the serving version, one line (replaced atomically)
      20261125T171500Z-1a2b3c4d/   one bundle per version (features.bundle)
      .tmp-<version>/         a publish in progress; never current, never listed

:func:`publish` writes a bundle into ``.tmp-<version>``, loads and validates it
there, renames it into place and only then switches ``CURRENT`` (temp file +
``os.replace``, both fsynced). A bundle that fails validation is deleted and
never switched to; a crash at any step leaves the previous ``CURRENT`` in
force (at worst a stray ``.tmp-*`` directory, which the next publish of the
same version replaces). After the switch, when a Redis URL is given, the
version is stored under ``model:current`` and announced on
``model:announce`` so stream workers and API processes reload.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from features.bundle import MANIFEST, VERSION_RE, Bundle, BundleWriter
from features.errors import InvalidBundle
from features.keys import KeySchema

__all__ = ["CURRENT", "VersionInfo", "announce", "current", "list_versions", "publish", "rollback", "show"]

log = logging.getLogger(__name__)

CURRENT = "CURRENT"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One published version, as listed by :func:`list_versions`."""

    version: str
    created_at: str
    current: bool
    n_users: int
    n_items: int
    has_ranker: bool
    has_content: bool
    size_bytes: int
    metrics: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current(registry: str | Path) -> str | None:
    """The version ``CURRENT`` points at, ``None`` for an empty registry."""
    try:
        text = (Path(registry) / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def _switch_current(registry: Path, version: str) -> None:
    tmp = registry / f".{CURRENT}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, registry / CURRENT)
    _fsync_dir(registry)


def announce(redis_url: str, *, key_prefix: str, version: str, path: str | Path) -> int:
    """Set ``model:current`` and publish the version on ``model:announce``.

    Returns
    -------
    int
        Subscribers that received the announcement.
    """
    import redis

    keys = KeySchema(key_prefix)
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        message = orjson.dumps({"version": version, "path": str(path), "ts": int(time.time() * 1000)})
        pipe = client.pipeline(transaction=True)
        pipe.set(keys.model_current(), version)
        pipe.publish(keys.model_announce(), message)
        _, receivers = pipe.execute()
    finally:
        client.close()
    log.info("model announced version=%s receivers=%s", version, receivers)
    return int(receivers)


def publish(
    source: BundleWriter | str | Path,
    registry: str | Path,
    *,
    redis_url: str | None = None,
    key_prefix: str = "liftrec",
) -> str:
    """Publish a bundle and make it current.

    Parameters
    ----------
    source : BundleWriter or path
        A writer (written straight into the registry) or an existing bundle
        directory (copied in).
    registry : str or pathlib.Path
        The registry directory (created when missing).
    redis_url : str, optional
        When given, set ``model:current`` and announce on ``model:announce``.
    key_prefix : str, optional
        Redis key prefix (``Settings.key_prefix``).

    Returns
    -------
    str
        The published version.

    Raises
    ------
    InvalidBundle
        When the bundle fails validation; the registry's ``CURRENT`` is unchanged.
    """
    reg = Path(registry)
    reg.mkdir(parents=True, exist_ok=True)
    if isinstance(source, BundleWriter):
        version = source.version
    else:
        src = Path(source)
        try:
            version = str(orjson.loads((src / MANIFEST).read_bytes())["version"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InvalidBundle(f"bundle {src}: cannot read the version from {MANIFEST}: {err}") from None
    if not VERSION_RE.match(version):
        raise InvalidBundle(f"version {version!r} is not <yyyymmddThhmmssZ>-<hash8>")
    final = reg / version
    fresh = not final.exists()
    if not fresh:
        log.info("version %s already in the registry; validating and switching to it", version)
    else:
        tmp = reg / f".tmp-{version}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            if isinstance(source, BundleWriter):
                source.write(tmp, version=version)
            else:
                shutil.copytree(Path(source), tmp)
            Bundle.load(tmp).validate()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        _fsync_dir(reg)
    _activate(reg, version, redis_url=redis_url, key_prefix=key_prefix, validated=fresh)
    log.info("model published version=%s registry=%s", version, reg)
    return version


def _activate(reg: Path, version: str, *, redis_url: str | None, key_prefix: str,
              validated: bool = False) -> None:
    if not validated:
        Bundle.load(reg / version).validate()
    _switch_current(reg, version)
    if redis_url:
        announce(redis_url, key_prefix=key_prefix, version=version, path=reg / version)


def rollback(version: str, registry: str | Path, *, redis_url: str | None = None,
             key_prefix: str = "liftrec") -> None:
    """Make an already published ``version`` current again (validated first).

    Raises
    ------
    InvalidBundle
        When the version is unknown or fails validation (``CURRENT`` unchanged).
    """
    reg = Path(registry)
    if not VERSION_RE.match(version) or not (reg / version / MANIFEST).is_file():
        known = ", ".join(i.version for i in list_versions(reg)) or "none"
        raise InvalidBundle(f"no version {version!r} in registry {reg}; known: {known}")
    _activate(reg, version, redis_url=redis_url, key_prefix=key_prefix)
    log.info("model rolled back version=%s registry=%s", version, reg)


def show(registry: str | Path, version: str | None = None) -> dict[str, Any]:
    """The manifest of ``version`` (default: the current one).

    Raises
    ------
    InvalidBundle
        When there is no such version (or no current one).
    """
    reg = Path(registry)
    v = version or current(reg)
    if v is None:
        raise InvalidBundle(f"registry {reg} has no current version")
    try:
        return dict(orjson.loads((reg / v / MANIFEST).read_bytes()))
    except FileNotFoundError:
        raise InvalidBundle(f"no version {v!r} in registry {reg}") from None


def list_versions(registry: str | Path) -> list[VersionInfo]:
    """Published versions, oldest first (in-progress ``.tmp-*`` directories excluded)."""
    reg = Path(registry)
    if not reg.is_dir():
        return []
    cur = current(reg)
    out = []
    for d in sorted(reg.iterdir()):
        if not (d.is_dir() and VERSION_RE.match(d.name) and (d / MANIFEST).is_file()):
            continue
        try:
            m = orjson.loads((d / MANIFEST).read_bytes())
        except ValueError:
            log.warning("unreadable manifest in %s; skipped", d)
            continue
        arts = m.get("artifacts", {})
        out.append(VersionInfo(
            version=d.name, created_at=str(m.get("created_at", "")), current=d.name == cur,
            n_users=int(arts.get("users.txt", {}).get("rows", 0)),
            n_items=int(arts.get("items.txt", {}).get("rows", 0)),
            has_ranker="ranker.onnx" in arts, has_content="content.npy" in arts,
            size_bytes=sum(int(a.get("bytes", 0)) for a in arts.values()),
            metrics=dict(m.get("metrics", {}))))
    return out
