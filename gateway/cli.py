"""``imagegate serve | check | --version``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.config import Config, ConfigError, load_config
from gateway.cost import estimate


def _fmt_price(config: Config, name: str) -> str:
    cost = config.backends[name].cost
    parts = [f"{k}={getattr(cost, k)}" for k in ("per_image", "per_megapixel", "per_step", "per_gpu_second",
                                                 "per_second") if getattr(cost, k) is not None]
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
        lines.append(f"  {name:<16} quality_floor={t.quality_floor} latency_budget_s={t.latency_budget_s}{default}{picked}")
    lines += ["", "routes:"]
    for r in config.routes:
        match = ", ".join(f"{k}={list(v)}" for k, v in (("models", r.match.models), ("tiers", r.match.tiers),
                                                         ("sizes", r.match.sizes)) if v) or "anything"
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
    import uvicorn

    from gateway.logs import configure

    configure()
    host = args.host or config.server.host
    port = args.port or config.server.port
    # Production settings: uvloop + httptools, no access log (the gateway writes its own line per request).
    from gateway.server import protocol

    # http=protocol(): uvicorn's httptools protocol, one write per response, clock from request arrival.
    kwargs = dict(host=host, port=port, loop="auto", http=protocol(), access_log=False, log_level="warning",
                  timeout_keep_alive=30)
    if args.workers > 1:
        os.environ["IMAGEGATE_CONFIG"] = config.source
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=args.workers, **kwargs)  # type: ignore[arg-type]
    else:
        from gateway.app import create_app

        print(f"imagegate {__version__} serving {config.source} on http://{host}:{port}", file=sys.stderr)
        uvicorn.run(create_app(config), **kwargs)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
