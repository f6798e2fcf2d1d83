"""`lora-dpo` — argument parsing and exit codes only.

    lora-dpo RECIPE.yaml [section.key=value ...]          train (same as `lora-dpo train …`)
    lora-dpo validate RECIPE.yaml [section.key=value ...] check a recipe; loads no model
    lora-dpo inspect RECIPE.yaml [key=value ...] [-n N] [--split eval]  N pairs as the model sees them + the data report
    lora-dpo eval RUN_DIR [--reward-model M]               held-out metrics, KL, generations (+ win rate)
    lora-dpo export RUN_DIR --format adapter|merged|gguf  adapter / merged model / GGUF, with parity.json
    lora-dpo keys                                          every recipe key with its type, default and meaning
    lora-dpo estimate RECIPE.yaml [key=value ...] [--gpu-memory 16GiB] [--json] [--data]  will it fit?

User errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

from lora_dpo.errors import LoraDpoError, TrainingStopped

COMMANDS = ("train", "validate", "eval", "export", "keys", "inspect", "estimate")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-dpo", description="DPO on LoRA adapters over a 4-bit base.",
                                epilog="Run `lora-dpo RECIPE.yaml` to train; `lora-dpo keys` documents the recipe.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train from a recipe"), ("validate", "check a recipe without loading a model")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe")
        s.add_argument("overrides", nargs="*", help="section.key=value, typed like the schema")
    e = sub.add_parser("eval", help="evaluate a finished run on its held-out data")
    e.add_argument("run_dir")
    e.add_argument("--data", help="a .jsonl file of pairs instead of the run's data.eval")
    e.add_argument("--generations", type=int, help="prompts to show side by side (default: the recipe's)")
    e.add_argument("--reward-model", metavar="PATH_OR_ID",
                   help="a sequence-classification reward model that scores policy vs reference answers (win rate)")
    e.add_argument("--reward-prompts", type=int, help="held-out prompts scored by --reward-model "
                   "(default: the recipe's evaluation.reward_prompts)")
    x = sub.add_parser("export", help="write the adapter, a merged model or a GGUF file, with a parity report")
    x.add_argument("run_dir")
    x.add_argument("--format", default="adapter", choices=("adapter", "merged", "gguf"))
    x.add_argument("--base", default="dequantized", choices=("dequantized", "original"),
                   help="merge into the NF4 round trip of the base (computes the trained policy) or the original "
                   "weights")
    x.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="merged weights' dtype")
    x.add_argument("--gguf-type", default="bf16", choices=("bf16", "f16", "q8_0"))
    x.add_argument("--out", help="export directory (default: RUN_DIR/export/FORMAT[-BASE])")
    x.add_argument("--data", help="a .jsonl file of pairs for the parity check instead of the run's data.eval")
    x.add_argument("--force", action="store_true", help="replace an existing export")
    sub.add_parser("keys", help="print every recipe key")
    i = sub.add_parser("inspect", help="show pairs exactly as the model will see them, and the data report")
    i.add_argument("recipe")
    i.add_argument("overrides", nargs="*", help="section.key=value, typed like the schema")
    i.add_argument("-n", "--rows", type=_count, default=3, help="pairs to render (default 3)")
    i.add_argument("--split", choices=("train", "eval"), default="train")
    m = sub.add_parser("estimate", help="predict peak GPU memory and the largest batch / max_length that fit")
    m.add_argument("recipe")
    m.add_argument("overrides", nargs="*", help="section.key=value, typed like the schema")
    m.add_argument("--gpu-memory", help="e.g. 16GiB, 24GB, 80G (default: the visible GPU's memory, else 16GiB)")
    m.add_argument("--layout", choices=("concatenated", "shared", "packed"), help="default: the recipe's")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.add_argument("--data", action="store_true", help="plan for the training data's own longest pairs (reads and "
                   "tokenises the data: the tokenizer only, no weights)")
    return p


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of rows >= 0, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"lora-dpo: error: {message}; see `lora-dpo --help`", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        typo = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.75)
        if typo and not os.path.exists(argv[0]):
            print(f"lora-dpo: error: unknown command '{argv[0]}'; did you mean '{typo[0]}'? (commands: "
                  f"{', '.join(COMMANDS)}, or a recipe file to train)", file=sys.stderr)
            return 2
        argv.insert(0, "train")
    parser = _parser()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may also follow the options (estimate R.yaml --gpu-memory 24GiB train.x=1)
        if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides += extra
        elif extra:
            unit = vars(args).get("gpu_memory") and re.fullmatch(r"[KMGT]i?B?", extra[0], re.IGNORECASE)
            parser.error(f"unrecognized arguments: {' '.join(extra)}" + (
                f" (write the size as one word: --gpu-memory {args.gpu_memory}{extra[0]})" if unit else ""))
    except SystemExit as e:  # argparse already printed a one-line usage error; normalise its code to 2
        return 0 if e.code == 0 else 2
    try:
        return _dispatch(args)
    except LoraDpoError as e:
        print(f"lora-dpo: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # already said: where the checkpoint is and how to resume
        return {"SIGINT": 130, "SIGTERM": 143}[e.result.stopped]
    except KeyboardInterrupt:
        print("lora-dpo: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from lora_dpo import recipe as recipe_lib

    if args.command == "keys":
        print(recipe_lib.describe_keys())
        return 0
    if args.command == "eval":
        from lora_dpo.evaluate import evaluate

        evaluate(args.run_dir, data=args.data, generations=args.generations, reward_model=args.reward_model,
                 reward_prompts=args.reward_prompts)
        return 0
    if args.command == "export":
        from lora_dpo.export import export

        export(args.run_dir, format=args.format, base=args.base, dtype=args.dtype, out=args.out, force=args.force,
               gguf_type=args.gguf_type, data=args.data)
        return 0
    r = recipe_lib.load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        from lora_dpo.data import check_local_sources
        from lora_dpo.model import check_local_model

        unchecked = [f"model {r.model.name_or_path}"] if not check_local_model(r.model) else []
        unchecked += [f"data set {h}" for h in dict.fromkeys(check_local_sources(r.data))]
        print(f"{args.recipe}: valid ({r.dpo.loss_type}, β={r.dpo.beta}, LoRA r={r.lora.r}, "
              f"model {r.model.name_or_path})")
        if unchecked:
            print(f"not checked (hub ids; read when training): {', '.join(unchecked)}")
        for note in recipe_lib.recipe_notes(r):
            print(f"note: {note}")
        return 0
    if args.command == "estimate":
        from lora_dpo.estimate import run as estimate

        print(estimate(r, gpu_memory=args.gpu_memory, layout=args.layout, as_json=args.json, with_data=args.data))
        return 0
    if args.command == "inspect":
        from lora_dpo.data_inspect import inspect

        inspect(r, rows=args.rows, split=args.split)
        return 0
    from lora_dpo.train import run

    run(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
