"""``imagegate serve | check | --version``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from gateway import __version__
from gateway.config import Config, ConfigError, load_config
from gateway.cost import estimate
from gateway.images import IMAGE_DIR_ENV


def _fmt_price(config: Config, name: str) -> str:
    cost = config.backends[name].cost
    parts = [
        f"{k}={getattr(cost, k)}"
        for k in ("per_image", "per_megapixel", "per_step", "per_gpu_second", "per_second")
        if getattr(cost, k) is not None
    ]
    return ", ".join(parts) or "unknown"


def describe(config: Config) -> str:
    """The resolved configuration as text: backends, tiers, routes, prices (secrets never shown)."""
    from backends.base import ImageRequest

    lines = [f"config: {config.source}", "", "backends:"]
    width, _, height = config.server.default_size.partition("x")
    probe = ImageRequest(prompt="", width=int(width), height=int(height))
    for name, b in config.backends.items():
        est = estimate(b.cost, probe)
        lines.append(
            f"  {name:<16} type={b.type:<11} quality={b.quality:<4} required={str(b.required).lower():<5} "
            f"price: {_fmt_price(config, name)} ({probe.size} x1 ≈ {'unknown' if est is None else f'${est:.4f}'})"
        )
    for name, why in config.disabled.items():
        lines.append(f"  {name:<16} disabled: {why}")
    lines += ["", "tiers:"]
    for name, t in config.tiers.items():
        default = " (default)" if name == config.default_tier else ""
        picked = f" picked by quality={list(t.qualities)}" if t.qualities else ""
        lines.append(
            f"  {name:<16} quality_floor={t.quality_floor} latency_budget_s={t.latency_budget_s}{default}{picked}"
        )
    lines += ["", "routes:"]
    for r in config.routes:
        match = (
            ", ".join(
                f"{k}={list(v)}"
                for k, v in (("models", r.match.models), ("tiers", r.match.tiers), ("sizes", r.match.sizes))
                if v
            )
            or "anything"
        )
        cands = " → ".join(c.backend + (f"{dict(c.options)}" if c.options else "") for c in r.candidates)
        lines.append(f"  {r.name:<16} match {match}; strategy {r.strategy}: {cands}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagegate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imagegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="routes.yaml (default: ./routes.yaml, else the embedded default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    check = sub.add_parser("check", help="validate a config and print the resolved routes")
    check.add_argument("config", nargs="?")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"imagegate: invalid config: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(describe(config))
        return 0
    return _serve(config, args)


def _serve(config: Config, args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("imagegate: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        local = [name for name, b in config.backends.items() if b.type == "local_sdxl"]
        if local:
            # Each worker would load its own copy of the model onto the same device (and run its own queue).
            print(
                f"imagegate: --workers {args.workers} cannot be used with a local_sdxl backend "
                f"({', '.join(local)}): every worker process would load its own copy of the model onto "
                "the same device. Serve it with one worker (the local backend batches requests on its "
                "device worker), or run the model in its own server (cog, Triton) behind a remote backend.",
                file=sys.stderr,
            )
            return 2

    import uvicorn

    from gateway.logs import configure
    from gateway.server import uvicorn_settings

    configure()
    # The production settings (protocol, timeouts, limits): the same function builds the test servers'.
    kwargs = uvicorn_settings(config, host=args.host, port=args.port)
    where = f"http://{kwargs['host']}:{kwargs['port']}"
    if args.workers == 1:
        from gateway.app import create_app

        print(f"imagegate {__version__} serving {config.source} on {where}", file=sys.stderr)
        uvicorn.run(create_app(config), **kwargs)
        return 0
    # Each worker process builds its own gateway from $IMAGEGATE_CONFIG (gateway.app.app_from_env). url
    # images go to one directory they all share, so a link from one worker is served by every other.
    os.environ["IMAGEGATE_CONFIG"] = config.source
    scratch = None
    if not config.server.image_dir:
        scratch = tempfile.mkdtemp(prefix="imagegate-images-")
        os.environ[IMAGE_DIR_ENV] = scratch
    print(f"imagegate {__version__} serving {config.source} on {where} with {args.workers} workers", file=sys.stderr)
    try:
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=args.workers, **kwargs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
