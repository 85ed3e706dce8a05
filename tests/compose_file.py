"""Reading compose/compose.yaml as docker compose would: YAML merge keys resolved,
``${VAR:-default}`` interpolated with the defaults (no environment)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group("default") or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return interpolate(data)


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts, host paths resolved."""
    out = []
    for volume in service.get("volumes", []):
        source, target = [*volume.split(":"), ""][:2]
        if source.startswith((".", "/")):
            out.append(((COMPOSE_DIR / source).resolve(), target))
    return out


def container_path(service: dict[str, Any], path: str) -> Path | None:
    """The host file a path inside the container comes from, if a bind mount provides it."""
    for host, target in bind_mounts(service):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return host / path[len(target) :].lstrip("/")
    return None
