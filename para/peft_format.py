"""Hugging Face PEFT folders in and out: LoRA and (IA)^3 adapters that PEFT, vLLM or LoRAX
trained or serve load here, and those trained here leave as PEFT folders.

A PEFT folder (`save_pretrained`) is adapter_config.json (the method and its settings) and
adapter_model.safetensors, whose tensors are named after the transformers module they adapt:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in)     ours: lora_a (1, in, r)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out, r)    ours: lora_b (1, r, out)
    base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l           (out, 1)    ours: ia3 (1, out)
    base_model.model.model.layers.{i}.mlp.down_proj.ia3_l              (1, in)     a feedforward module: its input

PEFT scales LoRA by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; this project by
alpha / rank, so a rank-stabilised adapter reads as alpha = lora_alpha * sqrt(r). A setting
that changes what an adapter computes and that this project does not implement is refused in
one line, never ignored. PARA has no PEFT equivalent and is not exported.

    python -m para.peft_format export ADAPTER.pt OUT_DIR [--model DIR|NAME] [--base-name NAME]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from para.adapter_files import AdapterError, read_adapter, read_for as read_adapter_for
from para.adapters import AdapterConfig, expected_shapes
from para.baselines import SCALED_ON_INPUT, SITES
from para.cli import run_cli
from para.errors import UserError
from para.files import atomic_write
from para.loading import HF_TO_OURS, model_dir, rename
from para.model import Transformer

CONFIG, WEIGHTS, OLD_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."     # PEFT's wrapper around the transformers model
OURS_TO_HF = {ours: hf for hf, ours in HF_TO_OURS.items()}
LEAVES = {"lora": {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}, "ia3": {"ia3": "ia3_l"}}
METHODS = {"LORA": "lora", "IA3": "ia3"}

# Settings read, and settings that do not change what a trained adapter computes here (targets
# are read from the tensors themselves; feedforward modules from the shape of ia3_l).
READ = {"peft_type", "r", "lora_alpha", "use_rslora"}
INERT = {"base_model_name_or_path", "revision", "auto_mapping", "peft_version", "task_type", "inference_mode",
         "lora_dropout", "init_lora_weights", "init_ia3_weights", "fan_in_fan_out", "target_modules",
         "exclude_modules", "feedforward_modules", "layers_pattern", "megatron_core", "qalora_group_size"}
# Settings this project cannot represent, with the reason; any other unknown setting that is set
# is refused too.
UNSUPPORTED = {
    "use_dora": "DoRA rescales each adapted weight by a learned magnitude, which this project does not implement",
    "bias": "the adapter trains the base model's biases, which an adapter here cannot hold",
    "lora_bias": "the adapter trains a bias for lora_B, which an adapter here cannot hold",
    "modules_to_save": "the adapter carries whole trained copies of modules, which an adapter here cannot hold",
    "layers_to_transform": "the adapter adapts some layers only; here an adapter adapts every layer",
    "rank_pattern": "per-module ranks are not implemented here; one rank for every module",
    "alpha_pattern": "per-module alphas are not implemented here; one lora_alpha for every module",
}


def peft_name(layer: int, site: str, leaf: str) -> str:
    """PEFT's tensor name for one of ours: layer i's projection `site`, leaf lora_a, lora_b or ia3."""
    module = rename(f"layers.{layer}.{SITES[site]}.weight", OURS_TO_HF).removesuffix(".weight")
    return f"{PREFIX}{module}.{LEAVES['ia3' if leaf == 'ia3' else 'lora'][leaf]}"


def is_set(value: object) -> bool:
    return value not in (None, False, "none", "", [], {})


def read_settings(folder: Path) -> dict:
    if not (folder / CONFIG).is_file():
        raise AdapterError(f"{folder}: a folder, but not a PEFT adapter (no {CONFIG}); give an adapter file from "
                           "train.py or a folder from PEFT's save_pretrained")
    if not (folder / WEIGHTS).is_file():
        if (folder / OLD_WEIGHTS).is_file():
            raise AdapterError(f"{folder / OLD_WEIGHTS}: PEFT's older pickled format is not read (loading a pickle can "
                               f"run code); save the adapter again with save_pretrained, which writes {WEIGHTS}")
        raise AdapterError(f"{folder}: no {WEIGHTS} beside {CONFIG}; copy the whole folder PEFT wrote")
    try:
        settings = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{folder / CONFIG}: not readable JSON ({type(e).__name__}); copy it again") from None
    if not isinstance(settings, dict):
        raise AdapterError(f"{folder / CONFIG}: not a JSON object; copy it again")
    return settings


def check_settings(settings: dict, where: Path) -> str:
    """The method of PEFT's settings ("lora" or "ia3"); a setting that cannot be represented is refused."""
    kind = settings.get("peft_type")
    if kind not in METHODS:
        raise AdapterError(f"{where}: peft_type {kind!r} is not supported; only LORA and IA3 adapters load here")
    for key, value in settings.items():
        if key in READ or key in INERT or not is_set(value):
            continue
        reason = UNSUPPORTED.get(key, "a PEFT setting this project does not implement; save the adapter without it")
        raise AdapterError(f"{where}: {key} {json.dumps(value)} is not supported: {reason}")
    return METHODS[kind]


def adapter_config(settings: dict, method: str, targets: tuple[str, ...], where: Path) -> AdapterConfig:
    if method == "ia3":
        return AdapterConfig("ia3", targets=targets)
    rank, alpha = settings.get("r"), settings.get("lora_alpha", 8)   # 8: PEFT's default
    if type(rank) is not int or rank < 1 or type(alpha) not in (int, float) or not 0 < alpha < math.inf:
        raise AdapterError(f"{where}: r {rank!r} must be a positive integer and lora_alpha {alpha!r} a positive number")
    if settings.get("use_rslora"):   # PEFT scales by alpha / sqrt(r); ours is alpha / rank
        alpha = alpha * math.sqrt(rank)
    return AdapterConfig("lora", rank, targets=targets, alpha=float(alpha))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(folder / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{folder / WEIGHTS}: cannot read, truncated or not safetensors ({type(e).__name__}); "
                           "copy it again") from None


def read_for(model: Transformer, folder: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """A PEFT folder's adapter as ours (config and tensors, float32), checked against `model`: every
    layer adapted, every tensor shaped for this base. Each problem is one AdapterError line."""
    settings = read_settings(folder)
    method = check_settings(settings, folder / CONFIG)
    tensors = read_tensors(folder)
    base = f"the adapter was made for another base ({settings.get('base_model_name_or_path')})"
    ours_by_peft = {peft_name(i, site, leaf): (i, site, leaf) for i in range(model.config.num_layers)
                    for site in SITES for leaf in LEAVES[method]}
    unknown = sorted(name for name in tensors if name not in ours_by_peft)
    if unknown:
        raise AdapterError(f"{folder / WEIGHTS}: tensor {unknown[0]} is not one a {settings['peft_type']} adapter "
                           f"has here: this project adapts q, k, v, o, gate, up and down_proj of this model's "
                           f"{model.config.num_layers} layers")
    if not tensors:
        raise AdapterError(f"{folder / WEIGHTS}: holds no tensors; copy it again")
    targets = tuple(site for site in SITES if any(ours_by_peft[name][1] == site for name in tensors))
    config = adapter_config(settings, method, targets, folder / CONFIG)
    shapes = expected_shapes(model.config, config)
    state = {}
    for name, (i, site, leaf) in ours_by_peft.items():
        ours = f"layers.{i}.{SITES[site]}.{leaf}"
        if ours not in shapes:
            continue
        tensor, on_input = tensors.get(name), site in SCALED_ON_INPUT
        if tensor is None:
            raise AdapterError(f"{folder / WEIGHTS}: tensor {name} is missing: the adapter does not adapt every "
                               f"layer, or {base}")
        shape = list(peft_layout(torch.empty(shapes[ours]), leaf, on_input).shape)
        if leaf == "ia3" and list(tensor.shape) == shape[::-1]:
            raise AdapterError(f"{folder / CONFIG}: feedforward_modules: PEFT scales {SITES[site].split('.')[-1]} on "
                               f"its {'output' if on_input else 'input'}; here (IA)^3 scales down_proj on its input "
                               "and every other module on its output")
        if list(tensor.shape) != shape or not tensor.is_floating_point():
            raise AdapterError(f"{folder / WEIGHTS}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, this "
                               f"model and r={config.rank} need floating-point {shape}; {base}")
        state[ours] = ours_layout(tensor, leaf).float().contiguous()
    return config, state


def ours_layout(tensor: torch.Tensor, leaf: str) -> torch.Tensor:
    """PEFT's (r, in), (out, r), (out, 1) or (1, in) as ours: (1, in, r), (1, r, out), (1, width)."""
    return tensor.reshape(1, -1) if leaf == "ia3" else tensor.T[None]


def peft_layout(tensor: torch.Tensor, leaf: str, on_input: bool) -> torch.Tensor:
    """The inverse of ours_layout."""
    if leaf == "ia3":
        return tensor.reshape((1, -1) if on_input else (-1, 1)).contiguous()
    return tensor[0].T.contiguous()


def peft_folder(config: AdapterConfig, state: dict[str, torch.Tensor], num_layers: int,
                base_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json's settings and adapter_model.safetensors's tensors for one of our LoRA
    or (IA)^3 adapters."""
    tensors = {peft_name(i, site, leaf): peft_layout(state[f"layers.{i}.{SITES[site]}.{leaf}"], leaf,
                                                     site in SCALED_ON_INPUT)
               for i in range(num_layers) for site in config.targets for leaf in LEAVES[config.method]}
    modules = [SITES[site].split(".")[-1] for site in config.targets]
    common = {"base_model_name_or_path": base_name, "task_type": "CAUSAL_LM", "target_modules": modules,
              "modules_to_save": None, "fan_in_fan_out": False, "inference_mode": True}
    if config.method == "ia3":
        settings = {"peft_type": "IA3", **common, "init_ia3_weights": True,
                    "feedforward_modules": [SITES[site].split(".")[-1] for site in config.targets
                                            if site in SCALED_ON_INPUT]}
    else:
        settings = {"peft_type": "LORA", **common, "r": config.rank, "lora_alpha": config.alpha or config.rank,
                    "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                    "layers_to_transform": None, "init_lora_weights": True}
    return settings, tensors


def export(adapter: Path, out: Path, model_path: Path | None = None, base_name: str | None = None) -> None:
    """Write the LoRA or (IA)^3 adapter file `adapter` as a PEFT folder `out`, checked against its
    base model (default: the built-in one), which adapter_config.json names."""
    if read_adapter(adapter)["config"].method == "para":   # before loading a model
        raise AdapterError(f"{adapter}: a PARA adapter has no PEFT equivalent (PEFT has no prompt-dependent "
                           "vectors); serve it with this project (generate.py, serve.py)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; give a folder for the PEFT adapter")
    from para.loading import load_model
    folder = model_dir(model_path)
    model = load_model(folder, device="cpu")
    config, state = read_adapter_for(model, adapter)
    settings, tensors = peft_folder(config, state, model.config.num_layers, base_name or str(folder.resolve()))
    # The tensors first: a folder whose config is written is complete.
    atomic_write(out / WEIGHTS, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(out / CONFIG, lambda f: f.write((json.dumps(settings, indent=2) + "\n").encode()))
    print(f"wrote {out}: {config.describe()} as a PEFT {settings['peft_type']} adapter for "
          f"{settings['base_model_name_or_path']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m para.peft_format", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="write a LoRA or (IA)^3 adapter file as a PEFT folder",
                              description="Write a LoRA or (IA)^3 adapter from train.py as a folder that "
                              "peft.PeftModel.from_pretrained (and vLLM, LoRAX) loads: adapter_config.json and "
                              "adapter_model.safetensors. PARA adapters have no PEFT equivalent.")
    out.add_argument("adapter", type=Path, help="an adapter file from train.py (--method lora or ia3)")
    out.add_argument("out", type=Path, help="the folder to write (created if missing; its two files replaced)")
    out.add_argument("--model", type=Path, default=None, help="the base model the adapter was trained on, which "
                     "it is checked against: a Hugging Face folder or a built-in name (default: smollm2-135m)")
    out.add_argument("--base-name", help="the base model adapter_config.json names (default: the --model folder's "
                     "absolute path), such as a hub id for the same weights")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    export(args.adapter, args.out, args.model, args.base_name)


if __name__ == "__main__":
    run_cli(main)
