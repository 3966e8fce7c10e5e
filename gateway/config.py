"""routes.yaml → one frozen, typed ``Config`` snapshot.

Parsed once at start (and by ``imagegate check``). Every error names the file, the key path and the reason;
unknown keys are errors. ``${VAR}`` / ``${VAR:-default}`` in string values are taken from the environment;
interpolated values are remembered as secrets so that logs, errors and ``redacted()`` never show them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from backends.base import EMPTY, BackendSpec, Capabilities, Timeouts
from backends.registry import BACKEND_TYPES, backend_class, effective_capabilities, route_options
from backends.settings import SettingsError, build
from gateway.redact import redact_config


class ConfigError(Exception):
    """Invalid configuration: names the file, the key path and the reason."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source, self.path, self.reason = source, path, reason
        super().__init__(f"{source}: {path or '<root>'}: {reason}")


Strategy = Literal["fallback", "cheapest", "fastest"]
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SIZE = re.compile(r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1_048_576
    default_deadline_s: float = 120.0
    default_size: str = "1024x1024"
    timing_allow_origin: str | None = None  # e.g. "*": lets browser scripts read Server-Timing cross-origin
    log_prompts: bool = False
    access_log: bool = True  # the one JSON line per request
    # Base of image URLs when response_format=url, e.g. https://images.example.com. Default: the address
    # the server is bound to — never the request's Host header, which any client can set.
    public_url: str | None = None
    image_ttl_s: float = 600.0
    image_store_bytes: int = 256 * 1024 * 1024
    # url images as files in this directory (shared by `serve --workers N`; N > 1 without it uses a
    # temporary directory). Unset with one worker: kept in memory.
    image_dir: str | None = None
    # Slow clients (gateway/server.py): a request's head must arrive within header_timeout_s of the
    # connection (or of its first byte on a kept-alive one), its body within body_timeout_s of the head —
    # deadlines, not idle timers — else 408 and the connection is closed; heads over max_header_bytes: 431.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 15.0  # a 1 MiB body needs 70 KB/s; prompts are a few KB
    max_header_bytes: int = 65_536
    keep_alive_s: float = 30.0  # an idle kept-alive connection is closed after this
    limit_concurrency: int | None = 1000  # open connections + running requests per process; more get a 503
    graceful_shutdown_s: float | None = None  # on shutdown, in-flight requests get this long (default_deadline_s + 5)
    max_retries: int = 1  # extra tries on the same backend, only when no work can have started
    retry_backoff_s: float = 0.25
    max_retry_after_s: float = 30.0
    cooldown_failures: int = 3  # consecutive retryable failures before a backend is demoted
    cooldown_s: float = 15.0
    # How long start-up waits for the backends' start() before the server listens anyway; slower ones
    # (model loading, compilation) keep starting while /readyz reports their progress.
    startup_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if not _SIZE.match(self.default_size):
            raise SettingsError("default_size", f"must look like 1024x1024, got {self.default_size!r}")
        if self.max_body_bytes < 1024:
            raise SettingsError("max_body_bytes", "must be at least 1024")
        if self.public_url is not None and not re.match(r"https?://[^/?#\s]+(/[^?#\s]*)?$", self.public_url):
            raise SettingsError("public_url", f"must be an http(s) URL without query, got {self.public_url!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "graceful_shutdown_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SettingsError(name, "must be above 0")
        if self.startup_wait_s < 0:
            raise SettingsError("startup_wait_s", "must be 0 or more")
        if self.max_header_bytes < 1024:
            raise SettingsError("max_header_bytes", "must be at least 1024")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise SettingsError("limit_concurrency", "must be at least 1 (or null for no limit)")


@dataclass(frozen=True, slots=True)
class CostModel:
    """Price of one request, summed over the parts that are set; all unset = unknown (never 0).

    ``per_gpu_second`` and ``per_second`` (provider-reported predict time) are estimated before the run
    from ``est_seconds_per_image`` or the observed average, and settled from the backend's report.
    """

    per_image: float | None = None
    per_megapixel: float | None = None
    per_step: float | None = None  # per image per denoising step
    per_gpu_second: float | None = None
    per_second: float | None = None
    est_seconds_per_image: float | None = None
    default_steps: int = 30  # for per_step pricing when the request does not say

    @property
    def known(self) -> bool:
        return any(
            v is not None
            for v in (self.per_image, self.per_megapixel, self.per_step, self.per_gpu_second, self.per_second)
        )


@dataclass(frozen=True, slots=True)
class _BackendEntry:
    type: str
    quality: float = 0.5
    cost: CostModel = field(default_factory=CostModel)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_concurrency: int = 16
    required: bool = False
    enabled_if_env: str | None = None  # the backend exists only when this environment variable is set
    description: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)
    settings: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        if not 0.0 <= self.quality <= 1.0:
            raise SettingsError("quality", "must be between 0 and 1")
        if self.max_concurrency < 1:
            raise SettingsError("max_concurrency", "must be at least 1")
        for size in self.capabilities.sizes:
            if not _SIZE.match(size):
                raise SettingsError("capabilities.sizes", f"{size!r} is not WIDTHxHEIGHT")
        for size in self.capabilities.max_n_per_size:
            if not _SIZE.match(size):
                raise SettingsError(f"capabilities.max_n_per_size.{size}", "is not WIDTHxHEIGHT")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    quality: float
    cost: CostModel
    required: bool
    description: str
    spec: BackendSpec

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def capabilities(self) -> Capabilities:
        return self.spec.capabilities


@dataclass(frozen=True, slots=True)
class Tier:
    name: str = ""
    quality_floor: float = 0.0
    latency_budget_s: float | None = None
    description: str = ""
    # OpenAI ``quality`` values that select this tier when a request names no tier (e.g. [low] for
    # preview): an unmodified OpenAI client can then choose a tier with a field it already has.
    qualities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Match:
    models: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CandidateConfig:
    backend: str
    options: Mapping[str, Any] = field(default_factory=lambda: EMPTY)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    candidates: tuple[CandidateConfig, ...]
    match: Match = field(default_factory=Match)
    strategy: Strategy = "fallback"

    def __post_init__(self) -> None:
        if not self.candidates:
            raise SettingsError("candidates", "needs at least one candidate")


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    server: ServerConfig
    backends: Mapping[str, BackendConfig]
    tiers: Mapping[str, Tier]
    routes: tuple[Route, ...]
    default_tier: str | None
    disabled: Mapping[str, str]  # backend name → why it is not in use
    secrets: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=lambda: EMPTY, repr=False)

    @property
    def models(self) -> tuple[str, ...]:
        """Every name a client may put in ``model``: route models and tier names."""
        names = dict.fromkeys(m for r in self.routes for m in r.match.models)
        names.update(dict.fromkeys(self.tiers))
        return tuple(names)

    def redacted(self) -> dict[str, Any]:
        """The configuration as written, ``${VAR}`` references kept, every credential masked: values from the
        environment, URL userinfo, header values, secret-looking free-form values (``gateway.redact``)."""
        redacted: dict[str, Any] = redact_config(self.raw, self.secrets)  # a mapping in, a dict out
        return redacted


def _interpolate(value: Any, path: str, secrets: list[str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = os.environ.get(name)
            if got is None:
                if default is None:
                    raise SettingsError(path, f"environment variable {name} is not set")
                return default
            if got:
                secrets.append(got)
            return got

        return _ENV.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", secrets) for i, v in enumerate(value)]
    return value


_TOP_KEYS = ("server", "backends", "tiers", "routes", "default_tier")


def _parse(doc: Any, source: str) -> Config:
    if not isinstance(doc, Mapping):
        raise SettingsError("", "the file must be a YAML mapping")
    for key in doc:
        if key not in _TOP_KEYS:
            raise SettingsError(str(key), f"unknown key (allowed: {', '.join(_TOP_KEYS)})")
    secrets: list[str] = []
    server = build(ServerConfig, doc.get("server"), "server")

    raw_backends = doc.get("backends") or {}
    if not isinstance(raw_backends, Mapping) or not raw_backends:
        raise SettingsError("backends", "must be a non-empty mapping of name → backend")
    backends: dict[str, BackendConfig] = {}
    disabled: dict[str, str] = {}
    for name, raw in raw_backends.items():
        path = f"backends.{name}"
        if isinstance(raw, Mapping) and raw.get("type") not in BACKEND_TYPES:
            raise SettingsError(
                f"{path}.type", f"unknown backend type {raw.get('type')!r} (known: {', '.join(BACKEND_TYPES)})"
            )
        entry = build(_BackendEntry, raw, path)
        if entry.enabled_if_env and not os.environ.get(entry.enabled_if_env):
            disabled[str(name)] = f"{entry.enabled_if_env} is not set"
            continue
        settings_raw = _interpolate(dict(entry.settings), f"{path}.settings", secrets)
        try:
            cls = backend_class(entry.type)
        except ImportError as exc:
            raise SettingsError(f"{path}.type", f"backend type {entry.type!r} cannot be loaded: {exc}") from None
        settings = build(cls.Settings, settings_raw, f"{path}.settings")
        try:
            # What these settings can really serve (e.g. only compiled shapes): the router never plans more.
            capabilities = effective_capabilities(cls, settings, entry.capabilities)
        except SettingsError as exc:
            raise SettingsError(f"{path}.{exc.path}" if exc.path else path, exc.reason) from None
        except ValueError as exc:
            raise SettingsError(path, str(exc)) from None
        spec = BackendSpec(
            name=str(name),
            type=entry.type,
            settings=settings,
            timeouts=entry.timeouts,
            capabilities=capabilities,
            max_concurrency=entry.max_concurrency,
        )
        backends[str(name)] = BackendConfig(
            str(name), entry.quality, entry.cost, entry.required, entry.description, spec
        )

    raw_tiers = doc.get("tiers") or {}
    if not isinstance(raw_tiers, Mapping):
        raise SettingsError("tiers", "must be a mapping of name → tier")
    tiers: dict[str, Tier] = {}
    for name, raw in raw_tiers.items():
        if isinstance(raw, Mapping) and "name" in raw:  # it would be overwritten by the key: refuse, not ignore
            raise SettingsError(f"tiers.{name}.name", "unknown key (a tier is named by its key under tiers)")
        tiers[str(name)] = build(Tier, {**(raw or {}), "name": str(name)}, f"tiers.{name}")
    claimed: dict[str, str] = {}
    for tier in tiers.values():
        for quality in tier.qualities:
            if quality in claimed:
                raise SettingsError(
                    f"tiers.{tier.name}.qualities", f"quality {quality!r} already selects tier {claimed[quality]!r}"
                )
            claimed[quality] = tier.name
    default_tier = doc.get("default_tier")
    if default_tier is not None and default_tier not in tiers:
        raise SettingsError("default_tier", f"{default_tier!r} is not a tier (tiers: {', '.join(tiers) or 'none'})")

    raw_routes = doc.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise SettingsError("routes", "must be a non-empty list of routes")
    routes = []
    for i, raw in enumerate(raw_routes):
        path = f"routes[{i}]"
        route = build(Route, raw, path)
        for tier_name in route.match.tiers:
            if tier_name not in tiers:
                raise SettingsError(f"{path}.match.tiers", f"{tier_name!r} is not a tier")
        for size in route.match.sizes:
            if not _SIZE.match(size):
                raise SettingsError(f"{path}.match.sizes", f"{size!r} is not WIDTHxHEIGHT")
        kept = []
        for j, cand in enumerate(route.candidates):
            if cand.backend in disabled:
                continue
            if cand.backend not in backends:
                raise SettingsError(f"{path}.candidates[{j}].backend", f"no backend named {cand.backend!r}")
            kept.append(_checked_options(cand, backends[cand.backend], f"{path}.candidates[{j}].options"))
        if not kept:
            raise SettingsError(f"{path}.candidates", "every candidate is disabled")
        routes.append(Route(route.name, tuple(kept), route.match, route.strategy))
    names = [r.name for r in routes]
    if len(set(names)) != len(names):
        raise SettingsError("routes", "route names must be unique")
    return Config(
        source=source,
        server=server,
        backends=MappingProxyType(backends),
        tiers=MappingProxyType(tiers),
        routes=tuple(routes),
        default_tier=default_tier,
        disabled=MappingProxyType(disabled),
        secrets=tuple(sorted(set(secrets), key=len, reverse=True)),
        raw=doc,
    )


def _checked_options(cand: CandidateConfig, backend: BackendConfig, path: str) -> CandidateConfig:
    """``cand`` with its ``options`` validated against the backend class's ``Options`` and settings, so a
    typo fails here (naming the key and the allowed values) instead of failing requests later."""
    try:
        options = route_options(backend_class(backend.type), backend.spec.settings, cand.options)
    except SettingsError as exc:
        raise SettingsError(f"{path}.{exc.path}" if exc.path else path, exc.reason) from None
    return cand if options is cand.options else CandidateConfig(cand.backend, options)


def load_config_text(text: str, source: str = "<string>") -> Config:
    """Parse YAML text. Raises ``ConfigError(source, key path, reason)``."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    try:
        return _parse(doc, source)
    except SettingsError as exc:
        raise ConfigError(source, exc.path, exc.reason) from None


DEFAULT_CONFIG = Path(__file__).with_name("default_routes.yaml")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path``; without one, ``./routes.yaml`` if present, else the embedded default."""
    if path is None:
        path = Path("routes.yaml") if Path("routes.yaml").is_file() else DEFAULT_CONFIG
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    return load_config_text(text, str(path))
