"""`lora-dpo inspect RECIPE.yaml`: pairs rendered exactly as the model will see them, and the data report.

Loads the tokenizer only (never model weights) and writes nothing: for a .gguf model whose converted checkpoint
is not cached yet, the tokenizer is read straight from the GGUF file's metadata.
"""

from __future__ import annotations

from pathlib import Path

from lora_dpo import data, gguf_source
from lora_dpo import model as model_lib
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import ModelConfig, Recipe

BOUNDARY = "┃"  # where the prompt ends and the scored completion begins


def load_tokenizer_only(cfg: ModelConfig):
    src = model_lib.resolve_source(cfg)
    if cfg.tokenizer is not None or src.kind != "gguf":
        return model_lib.load_tokenizer(cfg)
    gguf = Path(src.path)
    cached = gguf_source.gguf_cache_dir(gguf)
    if (cached / "config.json").is_file():
        return model_lib.load_tokenizer(ModelConfig(name_or_path=str(cached)))
    try:
        tok = gguf_source.gguf_tokenizer(gguf)
    except Exception as e:  # noqa: BLE001 - any parser failure means the file is unusable
        raise LoraDpoError(f"model.name_or_path: cannot read a tokenizer from GGUF file '{gguf}' "
                           f"({type(e).__name__}); is it a complete, uncorrupted .gguf model?") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def render(pair: data.Pair, where, tokenizer) -> str:
    """One pair: token counts, then the prompt and each completion decoded with special tokens shown."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    head = (f"── row {where}: prompt {len(pair.prompt_ids)} tokens {BOUNDARY} chosen {len(pair.chosen_ids)}, "
            f"rejected {len(pair.rejected_ids)}")
    prompt = text(pair.prompt_ids)
    return "\n".join([head, f"{prompt}{BOUNDARY}{text(pair.chosen_ids)}",
                      f"[same prompt]{BOUNDARY}{text(pair.rejected_ids)}", ""])


def inspect(recipe: Recipe, rows: int = 3, split: str = "train", say=print) -> data.Prepared:
    """Print `rows` pairs of `split` as tokenised for training, then the data report; apply data.on_problem."""
    train_rows, eval_rows = data.read_data(recipe.data)
    if split == "eval" and eval_rows is None:
        raise LoraDpoError("--split eval: the recipe has no eval data; set data.eval or data.eval_split")
    tokenizer = load_tokenizer_only(recipe.model)
    lines: list[str] = []
    prepared = data.prepare(recipe.data, tokenizer, train_rows, eval_rows, say=lines.append, check=False)
    pairs = prepared.train_pairs if split == "train" else prepared.eval_pairs
    source = train_rows if split == "train" else eval_rows
    say(f"{min(rows, len(pairs))} of {len(pairs)} {split} pairs as the model sees them ({BOUNDARY} = where the "
        "scored completion starts; special tokens shown):\n")
    for pair in pairs[:rows]:
        say(render(pair, source.origins[pair.index], tokenizer))
    for line in lines:
        say(line)
    data.data_report.check(prepared.reports, recipe.data.on_problem)
    return prepared
