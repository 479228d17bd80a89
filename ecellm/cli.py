"""The `ecellm` command: one entry point with a subcommand per job, each built from a dataclass of its settings.

    ecellm train --model DIR --data ECInstruct/ --out runs/ecellm       # TrainConfig (ecellm.configs)
    ecellm eval --model DIR --adapter DIR --data test.json --out results/   # EvalConfig (ecellm.configs)
    ecellm generate --model DIR --prompt "What is ..."                  # GenerateConfig (below)
    ecellm convert-gguf --gguf model.gguf --out DIR                     # ConvertConfig (below)
    ecellm data build subjqa --raw DIR --out data/subjqa                # DataBuildConfig (below, ecellm.sources)

`ecellm SUBCOMMAND --help` lists every flag. `python -m ecellm ...` is the same command; `python -m ecellm.train` and
`python -m ecellm.eval` keep working.

A subcommand parses its flags and checks its paths (a missing folder, an unknown model name, an output folder that
cannot be written) before it imports torch or loads a model, so a mistake is told in about a second.

Exit status: 0 done, 1 an expected error (bad input, a folder that cannot be used, a refused resume: one line on
stderr naming what and where, see `ecellm.errors.exit_on_error`), 2 a usage error (one line), 130 interrupted
(Ctrl-C). Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .configs import (
    EvalConfig,
    TrainConfig,
    check_eval_flags,
    check_files,
    check_folder,
    check_model,
    check_out,
    check_tokenizer,
    check_train_flags,
)
from .errors import exit_on_error, expected_errors  # noqa: F401 (public here too)
from .flags import DTYPES, dtype_name, option, parse_dtype, parse_flags, positive_int


@dataclass(kw_only=True)
class GenerateConfig:
    """Settings of `ecellm generate`: complete prompts with a checkpoint (and optionally a LoRA adapter)."""

    model: str = option(help="checkpoint directory (config.json + safetensors + tokenizer), or a real model's name "
                             "from ecellm.models.default.MODELS (e.g. qwen2.5-0.5b)")
    prompt: list[str] = option(help="prompt text(s), used verbatim")
    tokenizer: str | None = option(None, help="tokenizer directory (default: --model)")
    adapter: str | None = option(None, help="LoRA adapter directory (PEFT format), merged in")
    max_new_tokens: int = option(100, type=positive_int, help="tokens generated per prompt at most")
    temperature: float = option(0.0, help="sampling temperature (0: greedy decoding)")
    top_p: float = option(1.0, help="nucleus mass: sample from the most likely tokens that hold this much")
    seed: int = option(0, help="sampling seed")
    dtype: str = option("fp32", type=dtype_name, choices=tuple(DTYPES), help="precision of the weights")
    device: str = option("cpu", help="torch device (cpu, cuda, cuda:1, ...)")


def check_generate_flags(flags: GenerateConfig) -> None:
    """Refuse, before torch and the model load, a model, tokenizer or adapter that is not there."""
    check_model("--model", flags.model)
    check_tokenizer(flags.tokenizer)
    check_folder("--adapter", flags.adapter)


@dataclass(kw_only=True)
class ConvertConfig:
    """Settings of `ecellm convert-gguf`: a Llama- or Qwen2-architecture GGUF file into a checkpoint directory."""

    gguf: str = option(help="the .gguf file")
    out: str = option(help="the checkpoint directory to write (absent or empty)")


def check_convert_flags(flags: ConvertConfig) -> None:
    """Refuse, before anything is read, a GGUF file that is not there and an output folder that cannot be made."""
    check_files("--gguf", flags.gguf)
    check_out("--out", flags.out)


@dataclass(kw_only=True)
class DataBuildConfig:
    """Settings of `ecellm data build SOURCE`: a raw public source as ECInstruct's train/validation/test files."""

    out: str = field(metadata={"help": "folder to create (new or empty): train.json, validation.json, test.json"})
    raw: str | None = field(default=None, metadata={"help": "folder of the source's files (default: fetched, for "
                                                            "the sources that can be; docs/real_data.md says where "
                                                            "each source is published)"})
    negatives: str = field(default="random", metadata={
        "choices": ("random", "hard"),
        "help": "amazon-google only: 'random' non-matching pairs (ECInstruct's), or 'hard': besides them, each "
                "matched Amazon product against its most similar non-matching Google product by title, and a "
                "test_hard.json of the test matches with theirs"})


def generate(argv: Sequence[str], prog: str) -> list[str]:
    """`ecellm generate`: print each prompt's continuation; returns them."""
    config = parse_flags(GenerateConfig, argv, prog=prog, description=GenerateConfig.__doc__,
                         check=check_generate_flags)
    from .generate import generate_text
    from .lora import load_adapter, merge
    from .models import load_pretrained

    model, tokenizer = load_pretrained(config.model, dtype=parse_dtype(config.dtype), device=config.device,
                                       tokenizer=config.tokenizer)
    if config.adapter:
        model = merge(load_adapter(model, config.adapter))
    texts = generate_text(model.eval(), tokenizer, config.prompt, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_p=config.top_p, seed=config.seed, progress=False)
    for text in texts:
        print(text)
    return texts


def convert_gguf(argv: Sequence[str], prog: str) -> None:
    """`ecellm convert-gguf`: write the checkpoint directory and say where."""
    config = parse_flags(ConvertConfig, argv, prog=prog, description=ConvertConfig.__doc__, check=check_convert_flags)
    from .models.gguf_convert import convert_gguf as convert

    print(f"wrote {convert(config.gguf, config.out)}")


def train(argv: Sequence[str], prog: str) -> dict:
    """`ecellm train`: a LoRA training run (`ecellm.train.train`) with the flags of `TrainConfig`; returns its
    summary."""
    config = parse_flags(TrainConfig, argv, prog=prog, check=check_train_flags,
                         description="LoRA instruction tuning on ECInstruct, the eCeLLM recipe, on one process or "
                                     "many (torchrun): see ecellm.train.")
    from .train import train as run_training

    return run_training(config)


def evaluate(argv: Sequence[str], prog: str) -> dict:
    """`ecellm eval`: an evaluation (`ecellm.eval.run`) with the flags of `EvalConfig`; returns its evaluation."""
    config = parse_flags(EvalConfig, argv, prog=prog, check=check_eval_flags,
                         description="Generate answers to ECInstruct test records, parse and score them per task and "
                                     "setting as the paper does: see ecellm.eval.")
    from .eval import run as run_evaluation

    return run_evaluation(config)


def data(argv: Sequence[str], prog: str) -> list:
    """`ecellm data build SOURCE --out DIR [--raw DIR]`: write the files, print records per setting and skipped rows;
    returns the files' paths. `ecellm data build --help` lists the sources; a missing or unknown source is a usage
    error (exit status 2)."""
    from .sources import SOURCES, build_report, claimed_folder, summary, write_files

    usage = f"usage: {prog} build {{{','.join(SOURCES)}}} --out DIR [--raw DIR]"
    if argv[:1] in (["-h"], ["--help"]) or argv[:2] in (["build", "-h"], ["build", "--help"]):
        print(f"{usage}\n\nBuild ECInstruct's files from a raw public source (docs/real_data.md says where each is "
              f"published); `{prog} build SOURCE --help` lists the flags. Sources:")
        for name, module in SOURCES.items():
            print(f"  {name:18} {', '.join(module.FILES)}")
        return []
    if argv[:1] != ["build"] or len(argv) < 2 or argv[1] not in SOURCES:
        print(f"{usage} (got {' '.join(argv[:2]) or 'nothing'})", file=sys.stderr)
        raise SystemExit(2)
    config = parse_flags(DataBuildConfig, argv[2:], prog=f"{prog} build {argv[1]}", description=DataBuildConfig.__doc__)
    if config.negatives != "random" and argv[1] != "amazon-google":
        print(f"{usage}: --negatives applies to amazon-google only", file=sys.stderr)
        raise SystemExit(2)
    with claimed_folder(config.out) as folder:
        built = build_report(argv[1], config.raw, config.negatives)
        paths = write_files(built.splits, folder)
    print(summary(built))
    print(f"wrote {', '.join(map(str, paths))}")
    return paths


COMMANDS: dict[str, Callable[[Sequence[str], str], object]] = {
    "train": train, "eval": evaluate, "generate": generate, "convert-gguf": convert_gguf, "data": data,
}


def run(argv: Sequence[str] | None = None) -> object:
    """Run `ecellm SUBCOMMAND [FLAGS]` (`sys.argv[1:]` when argv is None); returns what the subcommand returned."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return None
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: ecellm {{{','.join(COMMANDS)}}} [FLAGS] (got {' '.join(argv[:1]) or 'nothing'}); "
              "`ecellm SUBCOMMAND --help` lists the flags", file=sys.stderr)
        raise SystemExit(2)
    prog = f"ecellm {argv[0]}"
    return exit_on_error(prog, lambda: COMMANDS[argv[0]](argv[1:], prog))


def main(argv: Sequence[str] | None = None) -> None:
    """The console script `ecellm` (it exits with what this returns, so this returns None): `run(argv)`."""
    run(argv)
