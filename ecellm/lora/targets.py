"""Which `nn.Linear`s LoRA wraps: the paper's default targets per family, PEFT's matching rule, and the checks that
keep a target list or pattern from doing nothing, or from hanging.

PEFT's rule (kept): a list of names matches a module whose name equals an entry or ends in `.<entry>`; a string is a
regular expression that must match the whole module name. A string may come from an adapter file somebody else wrote,
so before it is matched it must pass `check_pattern`:

- it compiles, is at most `MAX_PATTERN_CHARS` long and holds no backreference;
- a quantifier that repeats more than once (`*`, `+`, `{2,}`, `{1,3}`) applies to one character, one class or a
  group of those (`.*`, `\\d+`, `(?:ab)+`), never to a group holding another quantifier or an alternation
  (`(a+)+`, `(a|ab)*`): those backtrack exponentially on a name that almost matches;
- at most `MAX_DEGREE` such quantifiers follow one another (`.*\\.layers\\.\\d+\\..*` has 3): k of them cost up to
  n^k steps on a name of n characters;
and matching it over a model's module names stops with an error once it has taken `MATCH_BUDGET_S` seconds.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable

from torch import nn

from ..errors import EcellmError

try:  # the parser `re` itself compiles with, so the check sees the tree `re` runs
    from re import _parser as _re_parser  # Python >= 3.11
except ImportError:  # Python 3.10
    import sre_parse as _re_parser  # type: ignore[no-redef]


class LoRAError(EcellmError, ValueError):
    """An expected error of `ecellm.lora`: targets that match nothing or would never run, a hostile or broken
    target pattern, an adapter file that does not fit the model, a 4-bit base asked to merge."""


# The paper's targets per family: every attention and MLP projection plus the LM head. Entries a model lacks are
# skipped (original T5 has `wi`, T5 v1.1 / Flan-T5 have `wi_0`, `wi_1`).
_LLAMA_LAYOUT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    # Mistral and Qwen2/Qwen3 name their linears as Llama does, so the paper's Llama targets apply to them unchanged
    "llama": _LLAMA_LAYOUT, "mistral": _LLAMA_LAYOUT, "qwen2": _LLAMA_LAYOUT, "qwen3": _LLAMA_LAYOUT,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head"],
}
# The paper's Phi-2 target names come from the old remote-code layout; map them onto the native layout.
PHI_ALIASES: dict[str, list[str]] = {
    "Wqkv": ["q_proj", "k_proj", "v_proj"], "out_proj": ["dense"], "linear": ["lm_head"],
}
# torch modules that use a child Linear's weight without calling the child, so a LoRA branch there never runs.
WEIGHT_READERS: dict[type[nn.Module], tuple[tuple[str, ...], str]] = {
    nn.MultiheadAttention: (("out_proj",), "nn.MultiheadAttention multiplies by out_proj.weight itself and never "
                                           "calls out_proj"),
    nn.TransformerEncoderLayer: (("linear1", "linear2"), "nn.TransformerEncoderLayer's inference fast path reads "
                                                         "linear1.weight and linear2.weight without calling them"),
}
Targets = list[str] | str

MAX_PATTERN_CHARS = 65536
MAX_DEGREE = 3
MATCH_BUDGET_S = 5.0
_ONE_CHARACTER = {"LITERAL", "NOT_LITERAL", "ANY", "IN", "AT"}  # atoms that match one character (or none: AT)


def model_family(model: nn.Module) -> str | None:
    """`model.config.model_type` ("llama", "t5", ...), or None for a model without one."""
    return getattr(getattr(model, "config", None), "model_type", None)


# --- patterns -----------------------------------------------------------------------------------------------------
def _one_character_each(items) -> bool:
    """Whether a repeated body is single-character atoms only (possibly grouped): one way to match each repeat."""
    for op, av in items:
        if op.name == "SUBPATTERN":
            if not _one_character_each(av[3]):
                return False
        elif op.name not in _ONE_CHARACTER:
            return False
    return True


def _degree(items, refuse) -> int:
    """The number of repeating quantifiers in a row in a parsed pattern (a branch counts as its costliest
    alternative); `refuse(why)` for a backreference or a repeat over anything but single characters."""
    degree = 0
    for op, av in items:
        if op.name.startswith("GROUPREF"):
            refuse("a backreference cannot be matched in bounded time")
        elif op.name.endswith("REPEAT"):  # MAX_REPEAT, MIN_REPEAT, POSSESSIVE_REPEAT: (min, max, body)
            if av[1] <= 1:
                degree += _degree(av[2], refuse)
            elif _one_character_each(av[2]):
                degree += 1
            else:
                refuse("a quantifier repeats a group that holds another quantifier or an alternation (nested "
                       "quantifiers backtrack exponentially)")
        elif op.name == "SUBPATTERN":  # (group, add_flags, del_flags, body)
            degree += _degree(av[3], refuse)
        elif op.name == "BRANCH":  # (None, [body, ...])
            degree += max(_degree(body, refuse) for body in av[1])
        elif op.name in ("ASSERT", "ASSERT_NOT"):  # (direction, body)
            degree += _degree(av[1], refuse)
        elif op.name == "ATOMIC_GROUP":
            degree += _degree(av, refuse)
    return degree


@functools.lru_cache(maxsize=64)
def check_pattern(pattern: str, where: str) -> re.Pattern:
    """`pattern` compiled, once it is known to match in bounded time (the rules in the module docstring).

    Args:
        pattern: a target regular expression (PEFT's `target_modules` as a string).
        where: what the message names: the adapter_config.json file, or "inject".
    Raises:
        LoRAError: the pattern does not compile, is too long, holds a backreference, a nested quantifier or more
            than `MAX_DEGREE` repeating quantifiers in a row.
    """
    def refuse(why: str):
        raise LoRAError(f"{where}: target_modules pattern {pattern[:80]!r} refused: {why}")

    if len(pattern) > MAX_PATTERN_CHARS:
        refuse(f"{len(pattern)} characters, the limit is {MAX_PATTERN_CHARS}")
    try:
        compiled = re.compile(pattern)
        tree = _re_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        refuse(f"it is not a regular expression ({e})")
    degree = _degree(tree, refuse)
    if degree > MAX_DEGREE:
        refuse(f"{degree} repeating quantifiers in a row, at most {MAX_DEGREE} (each multiplies the matching time)")
    return compiled


def matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a regular expression (checked by `check_pattern`) that must match the whole module
    name; a list matches a name equal to an entry or ending in `.<entry>`."""
    if isinstance(targets, str):
        return check_pattern(targets, "inject").fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select(names: Iterable[str], targets: Targets, where: str) -> list[str]:
    """The `names` that `targets` matches, in order.

    Args:
        names: module names.
        targets: a list of names / dotted suffixes, or a regular expression (checked by `check_pattern`).
        where: what an error names (a file, or "inject").
    Raises:
        LoRAError: the pattern is refused, or matching has taken more than `MATCH_BUDGET_S` seconds.
    """
    if not isinstance(targets, str):
        return [name for name in names if matches(name, targets)]
    pattern = check_pattern(targets, where)
    start, chosen = time.perf_counter(), []
    for name in names:
        if pattern.fullmatch(name):
            chosen.append(name)
        if time.perf_counter() - start > MATCH_BUDGET_S:
            raise LoRAError(f"{where}: target_modules pattern {targets[:80]!r} refused: matching it took over "
                            f"{MATCH_BUDGET_S:g} s (at {name!r}); use a list of module names")
    return chosen


# --- choosing the targets of a model ------------------------------------------------------------------------------
def resolve_targets(model: nn.Module, targets: Targets | None, linear_names: list[str]) -> Targets:
    """The targets to wrap: `targets` as given (Phi's old names mapped, duplicates dropped), or the family's default
    targets that the model has.

    Raises:
        LoRAError: `targets` is None and the model's family has no default targets (the message lists the Linears).
    """
    family = model_family(model)
    if targets is None:
        if family not in DEFAULT_TARGETS:
            raise LoRAError(
                f"inject: no default LoRA targets for {type(model).__name__} (config.model_type={family!r}; "
                f"families with defaults: {sorted(DEFAULT_TARGETS)}); pass targets=[...] naming some of its Linear "
                f"modules: {linear_names}"
            )
        return [t for t in DEFAULT_TARGETS[family] if any(matches(n, [t]) for n in linear_names)]
    if isinstance(targets, str):
        return targets
    targets = list(targets)
    if family == "phi":
        targets = [native for t in targets for native in PHI_ALIASES.get(t, [t])]
    return list(dict.fromkeys(targets))  # drop duplicates, keep order


def refuse_uncalled(model: nn.Module, chosen: list[str]) -> None:
    """Refuse a chosen Linear whose owner uses its weight without calling it (`WEIGHT_READERS`): its LoRA branch
    would never run, its gradients would stay None and the output would never change.

    Raises:
        LoRAError: naming the first such module and why.
    """
    for name in chosen:
        owner_name, _, child = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        for owner_type, (children, why) in WEIGHT_READERS.items():
            if isinstance(owner, owner_type) and child in children:
                raise LoRAError(f"inject: cannot wrap {name!r}: {why}, so its LoRA branch would never run; "
                                "target other Linear modules")
