"""Decide which model the local stack serves; prints the directory (or hub id) on stdout.

    python -m qwen_worker.model_source [--model ID_OR_DIR] [--demo-dir models/tiny] [--demo-shape tiny]

An explicit --model is used as given. Otherwise the real Qwen/Qwen2.5-0.5B-Instruct: from the local
Hugging Face cache, else downloaded (with huggingface_hub's progress bars). When neither works, the
offline demo model (built if missing), with a loud warning on stderr. Never silently.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# Weights and tokenizer only: the repository's other files are not needed to serve.
FILES = ["*.json", "*.safetensors", "*.txt", "merges.txt", "vocab.json"]

BANNER = """
################################################################################
#  DEMO MODEL: {model} could not be found in the local Hugging Face cache
#  nor downloaded ({reason}).
#  Serving {demo}: RANDOM WEIGHTS in the Qwen2 architecture.
#  Its sentiment labels and replies are MEANINGLESS; every response says
#  "demo_model": true. Set QAIO_MODEL to a local model directory to serve a real one.
################################################################################
"""


def resolve(model: str | None, demo_dir: Path, demo_shape: str) -> str:
    if model:
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(DEFAULT_MODEL, allow_patterns=FILES, local_files_only=True)
    except Exception:
        pass
    print(f"{DEFAULT_MODEL} is not in the local Hugging Face cache; downloading it...", file=sys.stderr)
    try:
        return snapshot_download(DEFAULT_MODEL, allow_patterns=FILES)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
    from .demo_model import DEMO_MARKER, build

    if not (demo_dir / DEMO_MARKER).is_file():
        build(demo_shape, demo_dir)
    print(BANNER.format(model=DEFAULT_MODEL, reason=reason, demo=demo_dir), file=sys.stderr)
    return str(demo_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="hub id or directory to use as is")
    parser.add_argument("--demo-dir", type=Path, default=Path("models/tiny"))
    parser.add_argument("--demo-shape", default="tiny", choices=("tiny", "qwen2.5-0.5b"))
    args = parser.parse_args(argv)
    print(resolve(args.model or None, args.demo_dir, args.demo_shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
