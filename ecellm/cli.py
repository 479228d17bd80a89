"""The `ecellm` command: one entry point with a subcommand per job, each built from a dataclass of its settings.

    ecellm train --model DIR --data ECInstruct/ --out runs/ecellm       # TrainConfig (ecellm.train)
    ecellm eval --model DIR --adapter DIR --data test.json --out results/   # EvalConfig (ecellm.eval)
    ecellm generate --model DIR --prompt "What is ..."                  # GenerateConfig (below)
    ecellm convert-gguf --gguf model.gguf --out DIR                     # ConvertConfig (below)
    ecellm data build subjqa --raw DIR --out data/subjqa                # DataBuildConfig (below, ecellm.sources)

`ecellm SUBCOMMAND --help` lists every flag. `python -m ecellm ...` is the same command; `python -m ecellm.train` and
`python -m ecellm.eval` keep working.

Exit status: 0 done, 1 an expected error (bad input, a folder that cannot be used, a refused resume: one line on
stderr naming what and where, see `expected_errors`), 2 a usage error. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .flags import DTYPE_ALIASES, DTYPES, parse_dtype, parse_flags, positive_int

T = TypeVar("T")


@dataclass(kw_only=True)
class GenerateConfig:
    """Settings of `ecellm generate`: complete prompts with a checkpoint (and optionally a LoRA adapter)."""

    model: str = field(metadata={"help": "checkpoint directory (config.json + safetensors + tokenizer), or a real "
                                         "model's name from ecellm.models.default.MODELS (e.g. qwen2.5-0.5b)"})
    prompt: list[str] = field(metadata={"help": "prompt text(s), used verbatim"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (default: --model)"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory (PEFT format), merged in"})
    max_new_tokens: int = field(default=100, metadata={"type": positive_int})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy decoding"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    dtype: str = field(default="fp32", metadata={"choices": (*DTYPES, *DTYPE_ALIASES)})
    device: str = "cpu"


@dataclass(kw_only=True)
class ConvertConfig:
    """Settings of `ecellm convert-gguf`: a Llama- or Qwen2-architecture GGUF file into a checkpoint directory."""

    gguf: str = field(metadata={"help": "the .gguf file"})
    out: str = field(metadata={"help": "the checkpoint directory to create (must not exist)"})


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
    from .generate import generate_text
    from .lora import load_adapter, merge
    from .models import load_pretrained

    config = parse_flags(GenerateConfig, argv, prog=prog, description=GenerateConfig.__doc__)
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
    from .models.gguf_convert import convert_gguf as convert

    config = parse_flags(ConvertConfig, argv, prog=prog, description=ConvertConfig.__doc__)
    print(f"wrote {convert(config.gguf, config.out)}")


def train(argv: Sequence[str], prog: str) -> None:
    """`ecellm train`: `python -m ecellm.train` with the same flags (`TrainConfig`)."""
    from .train import main

    main(list(argv))


def evaluate(argv: Sequence[str], prog: str) -> dict:
    """`ecellm eval`: `python -m ecellm.eval` with the same flags (`EvalConfig`); returns its evaluation."""
    from .eval import main

    return main(argv, prog=prog)


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


def expected_errors() -> tuple[type[Exception], ...]:
    """The errors that a user's input, files or folders cause (told in one line), as opposed to bugs: the
    `ecellm.errors.EcellmError` family, and `OSError` (a missing file, a full disk, a denied permission)."""
    from .errors import EcellmError

    return EcellmError, OSError


def exit_on_error(prog: str, command: Callable[[], T]) -> T:
    """`command()`, or for an expected error (`expected_errors`) the line `{prog}: error: {message}` on stderr and
    exit status 1."""
    try:
        return command()
    except expected_errors() as e:  # evaluated only when an exception is raised: no import at start-up
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


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
