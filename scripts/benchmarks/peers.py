"""The servers mlxq is measured beside: mlx-lm's own (`mlx_lm.server`) and vllm-mlx.

vllm-mlx pins an older mlx-lm than mlxq's and declares vision and UI packages
(torch, gradio, opencv, mlx-vlm) that its text server never imports, so it gets a
virtualenv of its own (`.venv-vllm-mlx`), built once: vllm-mlx without its
declared dependencies, then the ones its text path imports, pinned. Where that
cannot be built (no package index), the bench says so and runs without it.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

VLLM_MLX = "vllm-mlx==0.6.0"
VLLM_MLX_NEEDS = [
    "mlx-lm==0.31.3",  # the only release its pin (>=0.31.3,<0.32) allows
    "transformers==5.24.0",
    "fastapi==0.165.0",
    "uvicorn==0.54.0",
    "python-multipart==0.0.34",  # its upload routes refuse to start without it
    "jsonschema==4.26.0",  # imported by its tool calling at start
    "requests==2.34.2",  # imported by its multimodal module, which it always loads
    "psutil==7.2.2",  # its memory limit; without it a fixed 1.6 GB
    "mlx-embeddings==0.1.0",  # its /v1/embeddings (`--embedding-model`), for the embeddings shape
]


def mlx_requirement(extra: str) -> str:
    """The same MLX build as mlxq's, for the backend scripts/bench picked (MLXQ_MLX_EXTRA)."""
    pinned = version("mlx")
    if platform.system() == "Darwin" or not extra:
        return f"mlx=={pinned}"
    return f"mlx[{'cuda12' if extra == 'cuda' else extra}]=={pinned}"


def vllm_mlx_executable(root: Path, extra: str) -> Path | None:
    """`vllm-mlx` in its own virtualenv, built on first use; None (and why, printed) when it can't be."""
    venv = root / ".venv-vllm-mlx"
    executable = venv / "bin" / "vllm-mlx"
    wanted = "\n".join([VLLM_MLX, mlx_requirement(extra), *VLLM_MLX_NEEDS])
    stamp = venv / ".installed"
    if executable.exists() and stamp.exists() and stamp.read_text() == wanted:
        return executable
    print(f"building {venv} for {VLLM_MLX} (once)", flush=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, "--no-deps", VLLM_MLX], check=True)
        # pip reports the declared dependencies left out as conflicts, and exits 0.
        subprocess.run([*pip, mlx_requirement(extra), *VLLM_MLX_NEEDS], check=True, stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        print(f"vllm-mlx left out: its virtualenv could not be built ({exc})", flush=True)
        return None
    stamp.write_text(wanted)
    return executable


@dataclass
class Peer:
    name: str
    process: subprocess.Popen[bytes]
    base: str
    model: str
    ready_path: str


def start_mlx_lm(model_dir: Path, port: int, env: dict[str, str], quiet: dict[str, Any]) -> Peer:
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(command, env=env, **quiet)
    return Peer("mlx_lm.server", process, f"http://127.0.0.1:{port}", str(model_dir), "/v1/models")


def start_vllm_mlx(
    executable: Path, model_dir: Path, port: int, env: dict[str, str], quiet: dict[str, Any], home: Path
) -> Peer:
    """Continuous batching at mlx-lm's server's sizes (8 prompts prefilled together, 32 decoding);
    its own HOME, since it keeps its prefix cache on disk there between runs."""
    command = [
        str(executable),
        "serve",
        str(model_dir),
        "--served-model-name",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--continuous-batching",
        "--max-num-seqs",
        "32",
        "--completion-batch-size",
        "32",
        "--prefill-batch-size",
        "8",
    ]
    home.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command, env={**env, "HOME": str(home)}, **quiet)
    return Peer("vllm-mlx", process, f"http://127.0.0.1:{port}", "bench", "/health")
