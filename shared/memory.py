"""System memory, as the old server's health check reported it."""

from __future__ import annotations

from typing import Any

import psutil

from shared.settings import Settings

GIB = 1024**3


def snapshot(settings: Settings) -> dict[str, Any]:
    """The `memory` object of `/health` (DESIGN.md) for this machine."""
    vm = psutil.virtual_memory()
    return {
        "used_percent": round(vm.percent, 1),
        "available_gb": round(vm.available / GIB, 2),
        "total_gb": round(vm.total / GIB, 2),
        "warning_threshold": settings.memory_warning_percent,
        "critical_threshold": settings.memory_critical_percent,
    }


def status_for(used_percent: float, settings: Settings) -> str:
    """healthy / warning / critical by the configured thresholds."""
    if used_percent >= settings.memory_critical_percent:
        return "critical"
    if used_percent >= settings.memory_warning_percent:
        return "warning"
    return "healthy"
