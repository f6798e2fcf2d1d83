"""The recipe: YAML in, a validated `Recipe` out (the schema lives in `lora_dpo.schema`), typed `key=value`
overrides, and errors that name the key and suggest the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_dpo.errors import LoraDpoError
from lora_dpo.schema import (  # noqa: F401 — the schema's names are part of this module's interface
    _REQUIRED,
    _SECTION_TYPES,
    SECTIONS,
    DataConfig,
    DataSource,
    DpoConfig,
    EvaluationConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    QuantizationConfig,
    Recipe,
    TrainConfig,
    checkpointed_layers,
)


def _err(key: str, msg: str) -> LoraDpoError:
    return LoraDpoError(f"recipe key '{key}': {msg}")


def _closest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(options)}"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[1])}s"
    if dataclasses.is_dataclass(tp):
        return f"mappings ({', '.join(f.name for f in dataclasses.fields(tp))})"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp))


_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int → float where a float is wanted)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        specific = None  # a list of mappings fails on its own key (data.train[1].weight), not on the union
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except LoraDpoError as e:
                if (isinstance(value, list) and _is_mapping_list(option)) or (
                        isinstance(value, dict) and typing.get_origin(option) is dict):
                    specific = e
        if specific is not None:
            raise specific
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            if _is_mapping_list(tp):
                if not value:
                    raise _err(key, "is an empty list; give at least one source")
                return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
            return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = typing.get_args(tp)
            return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):  # stored as a plain mapping (defaults filled in): YAML/JSON round-trip it
        if isinstance(value, str) and value.strip():
            value = {"path": value}  # a bare path in a list of sources
        return dataclasses.asdict(_build_section(key, tp, value))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            value = float(value)  # 5e-5: a number in YAML 1.2 (and to TRL users), a string to PyYAML's YAML 1.1
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str) and value.strip():
            return value
    raise _err(key, f"got {value!r}, expected {_describe(tp)}")


def _is_mapping_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _err(name, f"expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _err(f"{name}.{key}", f"unknown key; {_closest(str(key), list(fields))}")
    values = {}
    for fname, f in fields.items():
        key = f"{name}.{fname}"
        if fname not in raw:
            if f.default is _REQUIRED:
                raise _err(key, f"missing; set it to {f.metadata['doc'][0].lower() + f.metadata['doc'][1:]}")
            continue
        value = _coerce(raw[fname], hints[fname], key)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[1](value):
            raise _err(key, f"got {value!r}, must be {check[0]}")
        values[fname] = value
    return cls(**values)


def _cross_checks(r: Recipe) -> None:
    q = r.quantization
    if q.load_in_4bit and q.load_in_8bit:
        raise _err("quantization.load_in_8bit", "cannot be combined with load_in_4bit: true; set one of them false")
    if r.data.max_prompt_length is not None and r.data.max_prompt_length >= r.data.max_length:
        raise _err("data.max_prompt_length", f"must be smaller than data.max_length ({r.data.max_length}) so that "
                   "completions keep at least one token")
    _check_data_sources(r.data)
    if r.dpo.label_smoothing and r.dpo.loss_type not in ("sigmoid", "robust", "simpo"):
        raise _err("dpo.label_smoothing", f"is used by loss_type sigmoid, robust or simpo, not {r.dpo.loss_type}; "
                   "remove it")
    if r.evaluation.behaviour_regex is not None:
        try:
            re.compile(r.evaluation.behaviour_regex)
        except re.error as e:
            raise _err("evaluation.behaviour_regex", f"is not a valid regular expression ({e})") from None
    if r.train.offload_activations and not r.train.gradient_checkpointing:
        raise _err("train.offload_activations", "moves the layer inputs gradient checkpointing keeps; set "
                   "train.gradient_checkpointing: true as well, or remove it")
    for key, items in (("train.report_to", r.train.report_to), ("output.export", r.output.export)):
        if len(set(items)) != len(items):
            raise _err(key, f"lists {sorted(i for i in set(items) if items.count(i) > 1)[0]!r} twice; list it once")
    if isinstance(r.lora.target_modules, str) and r.lora.target_modules != "all-linear":
        raise _err("lora.target_modules", f"got {r.lora.target_modules!r}: give 'all-linear' or a list of module "
                   f"names, e.g. [{r.lora.target_modules.strip('[]').split(',')[0].strip() or 'q_proj'}, v_proj]")


def recipe_notes(r: Recipe) -> list[str]:
    """Values the recipe sets that this run will not use, said rather than silently ignored (not errors: a recipe
    switching a feature off with one override keeps its other settings)."""
    notes = []
    if r.dpo.simpo_gamma != DpoConfig.simpo_gamma and r.dpo.loss_type != "simpo":
        notes.append(f"dpo.simpo_gamma ({r.dpo.simpo_gamma}) is used by loss_type simpo only; ignored with "
                     f"{r.dpo.loss_type}")
    t = r.train
    if t.gradient_checkpointing_layers != TrainConfig.gradient_checkpointing_layers and not t.gradient_checkpointing:
        notes.append(f"train.gradient_checkpointing_layers ({t.gradient_checkpointing_layers}) is ignored: "
                     "train.gradient_checkpointing is off")
    if t.eval_steps is not None and r.data.eval is None and r.data.eval_split is None:
        notes.append("train.eval_steps is ignored: there is no held-out data (set data.eval or data.eval_split)")
    if t.save_total_limit is not None and t.save_steps is None:
        notes.append("train.save_total_limit is ignored: no intermediate checkpoints are written (set "
                     "train.save_steps)")
    if t.max_steps > 0 and t.num_train_epochs != TrainConfig.num_train_epochs:
        notes.append(f"train.num_train_epochs ({t.num_train_epochs:g}) is ignored: train.max_steps "
                     f"({t.max_steps}) sets the length (-1 lets the epochs do it)")
    d = r.dpo
    if d.reference_cache_dir is not None and (d.reference != "precompute" or d.loss_type == "simpo"):
        notes.append("dpo.reference_cache_dir is ignored: no reference log-probs are precomputed (dpo.reference "
                     f"{d.reference}, loss_type {d.loss_type})")
    if d.reference == "precompute" and d.loss_type == "simpo":
        notes.append("dpo.reference: precompute is ignored: loss_type simpo uses no reference")
    if r.evaluation.behaviour_regex is not None and r.data.eval is None and r.data.eval_split is None:
        notes.append("evaluation.behaviour_regex is ignored: there is no held-out data (set data.eval or "
                     "data.eval_split)")
    if t.max_steps > 0 and (note := warmup_note(t, t.max_steps)):  # else known once the epochs are counted
        notes.append(note)
    return notes


def warmup_note(t: TrainConfig, steps: int) -> str | None:
    """Said when the warmup takes the whole run of `steps` steps: the peak learning rate is never reached."""
    if max(t.warmup_steps, t.warmup_ratio * steps) < steps:
        return None
    return (f"the warmup ({t.warmup_steps or f'{t.warmup_ratio:g} ×'} steps) is not shorter than the run's {steps} "
            "steps: the learning rate never reaches train.learning_rate")


def _check_data_sources(d: DataConfig) -> None:
    if d.eval_split is not None and d.eval is not None:
        raise _err("data.eval_split", "cannot be combined with data.eval; remove one of them")
    for split, sources in (("train", d.train), ("eval", d.eval)):
        for i, src in enumerate(sources if isinstance(sources, list) else []):
            key = f"data.{split}[{i}]"
            if src["weight"] is not None and src["count"] is not None:
                raise _err(f"{key}.count", "cannot be combined with weight; keep one of them")
            for role in src["columns"] or {}:
                if role not in ("prompt", "chosen", "rejected", "system"):
                    raise _err(f"{key}.columns.{role}", "unknown role; map prompt, chosen, rejected or system to "
                               "your column names, e.g. {prompt: question}")


def recipe_from_dict(raw: Any, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise LoraDpoError(f"{source}: expected a YAML mapping with sections {', '.join(SECTIONS)}")
    for name in raw:
        if name not in SECTIONS:
            raise _err(str(name), f"unknown section; {_closest(str(name), list(SECTIONS))}")
    for name in ("model", "data", "output"):
        if name not in raw:
            raise _err(name, f"missing section; add '{name}:' (see recipes/quickstart.yaml)")
    sections = {name: _build_section(name, _SECTION_TYPES[name], raw.get(name)) for name in SECTIONS}
    recipe = Recipe(**sections)
    _cross_checks(recipe)
    return recipe


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.max_steps=20' → (['train', 'max_steps'], 20). Values are YAML scalars, typed later by the schema."""
    if "=" not in item:
        raise LoraDpoError(f"override '{item}': expected section.key=value, e.g. train.max_steps=20")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise LoraDpoError(f"override '{item}': key must be section.key, e.g. dpo.beta=0.05")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        if text.strip()[:1] in "[{":  # meant as a list or mapping: a string would be a silent misreading
            raise LoraDpoError(f"override '{item}': the value is not a valid YAML list/mapping; write it like "
                               f"{key.strip()}=[a, b] (quote the whole argument in the shell)") from None
        value = text
    return parts, value


class _RepeatedKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would keep the last one
    silently, and the first may be the one the user reads."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _RepeatedKey(None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _safe_load_unique(text: str):
    """yaml.safe_load with _UniqueKeyLoader (a SafeLoader: plain data only, never objects or code)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides, validate everything. Loads no model."""
    path = Path(path)
    if not path.is_file():
        raise LoraDpoError(f"recipe file '{path}' not found; pass the path to a .yaml recipe (see recipes/)")
    try:
        raw = _safe_load_unique(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LoraDpoError(f"recipe file '{path}' is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        fix = "keep one of them" if isinstance(e, _RepeatedKey) else "fix the YAML syntax there"
        raise LoraDpoError(f"recipe file '{path}': {problem}{where}; {fix}") from None
    if raw is None:
        raise LoraDpoError(f"recipe file '{path}' is empty; start from recipes/quickstart.yaml")
    if isinstance(raw, dict):
        for item in overrides:
            (section, key), value = parse_override(item)
            if section in raw and not isinstance(raw[section], (dict, type(None))):
                raise _err(section, "expected a mapping of keys")
            raw.setdefault(section, {})
            if raw[section] is None:
                raw[section] = {}
            if section in SECTIONS:
                raw[section][key] = value
            else:
                raise _err(section, f"unknown section in override '{item}'; {_closest(section, list(SECTIONS))}")
    return recipe_from_dict(raw, source=str(path))


def _yaml_value(value: Any) -> str:
    """A default as it would be written in a recipe (null, true, 5.0e-05), so it can be copied into one."""
    if value == "(required)":
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def describe_keys() -> str:
    """The reference documentation of every recipe key, generated from the schema."""
    lines = []
    for name, cls in _SECTION_TYPES.items():
        lines.append(f"{name}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = "(required)" if f.default is _REQUIRED else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory())
            check = f" [{f.metadata['check'][0]}]" if f.metadata.get("check") else ""
            lines.append(f"  {f.name}: {_yaml_value(default)}  — {_describe(hints[f.name])}{check}. "
                         f"{f.metadata['doc']}")
        if cls is DataConfig:
            lines.append("  [train/eval as a list] — each entry is a mapping with these keys:")
            for f in dataclasses.fields(DataSource):
                default = "(required)" if f.default is _REQUIRED else f.default
                check = f" [{f.metadata['check'][0]}]" if f.metadata.get("check") else ""
                lines.append(f"    {f.name}: {_yaml_value(default)}  — "
                             f"{_describe(typing.get_type_hints(DataSource)[f.name])}"
                             f"{check}. {f.metadata['doc']}")
    return "\n".join(lines)
