"""Load a causal LM and its tokenizer from a local directory (save_pretrained) or a GGUF file,
find the modules to track, fingerprint model and tokenizer files. Nothing here downloads.

A GGUF file holds config, tokenizer and (quantised) weights in one file: transformers reads it
with the `gguf` package and dequantises the weights to `dtype`; its fingerprint is the file's."""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from infl.capture import ModuleSpec
from infl.errors import BadInput, UnsupportedModel
from infl.hashing import cached_file_sha256, note_file, note_listing, stat_key

__all__ = [
    "load_model",
    "load_tokenizer",
    "tracked_modules",
    "module_specs",
    "prepare_for_capture",
    "load_config",
    "context_length",
    "model_fingerprint",
    "tokenizer_fingerprint",
]

_MLP_CHILDREN = ("mlp", "feed_forward", "ffn")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")  # one of them holds the vocabulary
# everything AutoTokenizer reads: added_tokens.json changes the vocabulary too
_TOKENIZER_FILES = (
    *_VOCABULARY_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "merges.txt",
    "added_tokens.json",
)


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _check_model_dir(path: Path) -> None:
    if _is_gguf(path):
        if not path.is_file():
            raise BadInput(f"{path}: no such GGUF file")
        return
    if not path.is_dir():
        raise BadInput(
            f"{path} is not a local model directory", hint="pass a directory made by save_pretrained, or a .gguf file"
        )
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} has no config.json: not a Hugging Face model directory")


def _source(path: Path) -> tuple[str, dict]:
    """What `from_pretrained` takes for `path`: the directory, and the GGUF file's name in it."""
    return (str(path.parent), {"gguf_file": path.name}) if _is_gguf(path) else (str(path), {})


def _patch_gguf_loader() -> None:
    """Two fixes to transformers' GGUF loader, made once per process.

    It parses a GGUF file's metadata (its whole vocabulary, one element at a time) anew for the
    config, for the tokenizer and for the model: about 10 s each on SmolLM2's 49k tokens, most of a
    stage's start. Each file's parse is kept (copies are handed out: the callers edit what they get).

    It draws a tqdm bar of its own while it dequantises the tensors, which disable_progress_bar()
    does not reach: silenced, so that stderr holds infl's lines only (one JSON object per line
    under --log-format json, nothing but errors under --quiet)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.load_gguf_checkpoint
    if getattr(original, "_keeps_metadata", False):
        return
    parsed: dict = {}

    def load_gguf_checkpoint(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return original(path, return_tensors=return_tensors, **kwargs)
        key = (str(path), *stat_key(Path(path).stat()))  # as strictly as every cache of infl
        if key not in parsed:
            parsed[key] = original(path, return_tensors=False)
        return copy.deepcopy(parsed[key])

    load_gguf_checkpoint._keeps_metadata = True
    gguf_utils.load_gguf_checkpoint = load_gguf_checkpoint
    gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def _from_pretrained(cls, path: Path, what: str, **kwargs):
    where, extra = _source(path)
    if extra:
        _patch_gguf_loader()
    try:
        return cls.from_pretrained(where, local_files_only=True, **extra, **kwargs)
    except ImportError as e:  # reading GGUF needs the gguf package (and accelerate for the weights)
        raise BadInput(f"cannot read {path}: {str(e).splitlines()[0]}", hint="pip install 'infl[gguf]'") from e
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load {what} from {path}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # a truncated or damaged weights file: safetensors' own error type
        if type(e).__name__ != "SafetensorError":
            raise
        raise BadInput(f"cannot load {what} from {path}: damaged weights ({str(e).splitlines()[0]})") from e


def load_model(path: Path, device: str = "cpu", dtype: str = "float32") -> nn.Module:
    """The model in eval mode, on `device`, in `dtype` (float32 or bfloat16); offline only."""
    import transformers
    from transformers import AutoModelForCausalLM

    _check_model_dir(path)
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise BadInput(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    transformers.utils.logging.disable_progress_bar()  # our own progress bars only
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = _from_pretrained(AutoModelForCausalLM, path, "a causal LM", dtype=torch_dtype)
    return model.to(device).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    _check_model_dir(path)
    if not _is_gguf(path) and not any((path / name).is_file() for name in _VOCABULARY_FILES):
        # transformers >= 5 does not fail here: it builds an empty tokenizer from config.json alone
        raise BadInput(
            f"{path} has no tokenizer files ({', '.join(_VOCABULARY_FILES)})",
            hint="save the tokenizer into the model directory: tokenizer.save_pretrained(DIR)",
        )
    return _from_pretrained(AutoTokenizer, path, "a tokenizer")


def load_config(path: Path):
    """The model's config alone (no weights are read)."""
    from transformers import AutoConfig

    _check_model_dir(path)
    note_file(path if _is_gguf(path) else path / "config.json")
    return _from_pretrained(AutoConfig, path, "a model config")


def context_length(path: Path) -> int:
    """The model's context length, from its config alone (no weights are loaded)."""
    config = load_config(path).get_text_config()
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModel("the model config states no context length (max_position_embeddings)")


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _spec(name: str, module: nn.Module) -> ModuleSpec:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        d_in, d_out, transposed = module.weight.shape[0], module.weight.shape[1], True
    else:
        d_out, d_in, transposed = module.out_features, module.in_features, False
        if tuple(module.weight.shape) != (d_out, d_in):  # packed (e.g. 4-bit) weights
            raise UnsupportedModel(f"{name}: weight of shape {tuple(module.weight.shape)} is not a plain linear layer")
    return ModuleSpec(name=name, d_in=d_in, d_out=d_out, bias=module.bias is not None, transposed=transposed)


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n_layers = model.config.get_text_config().num_hidden_layers
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not found:
        raise UnsupportedModel("no list of decoder blocks found", hint="pass --modules REGEX")
    return min(found, key=lambda pm: pm[0].count("."))  # the outermost list


def _mlp_names(model: nn.Module) -> list[str]:
    prefix, blocks = _decoder_blocks(model)
    names = []
    for i, block in enumerate(blocks):
        children = dict(block.named_children())
        key = next((k for k in _MLP_CHILDREN if k in children), None)
        scope, base = (children[key], f"{prefix}.{i}.{key}") if key else (block, f"{prefix}.{i}")
        for sub, module in scope.named_modules():
            if key is None and not re.fullmatch(r"fc\d", sub):
                continue  # OPT keeps fc1/fc2 directly on the block
            if sub and _is_linear(module):
                names.append(f"{base}.{sub}")
            elif any(p.dim() == 3 for p in module.parameters(recurse=False)):
                raise UnsupportedModel(f"{base}.{sub}: fused expert weights are not linear layers")
    return names


def tracked_modules(model: nn.Module, selection: str = "mlp") -> list[ModuleSpec]:
    """`mlp` (the paper's choice), `all` (every linear layer except the output head) or a regex
    matched against full module names."""
    if selection == "mlp":
        names = _mlp_names(model)
    else:
        head = model.get_output_embeddings()
        linears = [(n, m) for n, m in model.named_modules() if _is_linear(m) and m is not head]
        if selection == "all":
            names = [n for n, _ in linears]
        else:
            try:
                pattern = re.compile(selection)
            except re.error as e:
                raise BadInput(f"--modules {selection!r} is not a valid regex: {e}") from e
            names = [n for n, _ in linears if pattern.search(n)]
    if not names:
        raise UnsupportedModel(f"--modules {selection!r} selects no linear layer of this model")
    return module_specs(model, names)


def module_specs(model: nn.Module, names: list[str]) -> list[ModuleSpec]:
    """Specs of named linear modules of a model (as an artifact records them: see
    stages.loaders.factors_module_specs for those a factors artifact recorded)."""
    try:
        return [_spec(n, model.get_submodule(n)) for n in names]
    except AttributeError as e:
        raise UnsupportedModel(f"the model has no module the artifact tracks: {e}") from e


def prepare_for_capture(model: nn.Module, specs: list[ModuleSpec]) -> None:
    """No parameter requires grad: capture starts the graph at the input embeddings (see
    capture.tap), so autograd computes activation gradients only and fills no .grad."""
    model.requires_grad_(False)


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + cached_file_sha256(path).encode())
    return digest.hexdigest()


def model_fingerprint(path: Path) -> str:
    """sha256 over config.json and the weight files (or the GGUF file)."""
    _check_model_dir(path)
    if _is_gguf(path):
        return _hash_files([path])
    note_listing(path)
    files = [path / "config.json"] + [p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    return _hash_files(files)


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 over the tokenizer files (a GGUF file holds its tokenizer: the file's)."""
    _check_model_dir(path)
    if _is_gguf(path):
        return _hash_files([path])
    note_listing(path)  # a tokenizer file added
    return _hash_files([path / name for name in _TOKENIZER_FILES if (path / name).is_file()])
