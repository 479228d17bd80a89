"""Per-task ECInstruct metrics, parsed and scored as the paper's evaluation (``evaluate.py``) does.

``score(task, predictions, references)`` returns the paper's primary metric for the task under the key named by
``result["metric"]``, the secondary figures of the paper's tables, ``n`` (outputs scored) and ``n_failed`` (outputs
that could not be parsed). Predictions are the generated responses (the text after ``### Response:``); references
are the records' ``output`` fields, except for QPR (see ``score_qpr``). Both are aligned by order.

Parsing follows the reference code exactly. The reference code has defects; by default ecellm corrects them, and
``paper_compat=True`` reproduces the reference numbers:

- failed outputs: the reference drops them from every denominator (a model that answers 1 of 100 questions, and
  that one right, scores 1.0); ecellm counts them as wrong answers. ``paper_compat`` drops them.
- empty outputs: the reference crashes on an empty multiple-choice answer (``pred[0]``); ecellm counts it as
  failed in both modes, since the crash produces no number to reproduce.
- any string scores: AVE output nested deeper than ``MAX_JSON_DEPTH`` (100) levels is failed in both modes (the
  reference's ``json.loads`` raises RecursionError from about 1,000 and stops the evaluation); a blank AG answer
  is failed and scores 0.
- AVE: the reference counts every (gold, predicted) pair that matches, so a triple predicted twice, or one
  predicted triple matching several gold triples under the relaxed OOD rule, scores several hits (recall can
  exceed 1). ecellm counts the hits of a maximum one-to-one matching. ``paper_compat`` counts all pairs.
- AVE of Flan-T5 (``ave_parser="t5"``, which ``ecellm.eval`` picks for T5 models in both modes): the reference's
  evaluate_T5.py parser keeps only the last item of each output (an indentation slip); ecellm keeps every item
  (see ``parse_ave_t5``). ``paper_compat`` keeps the last.
- QPR: the reference takes the ideal DCG from the predicted items' own gains, so a ranking that leaves the relevant
  products out (or repeats the best one) can score 1.0. ecellm takes the ideal DCG from all the options' gains and
  skips repeated letters. ``paper_compat`` does as the reference.

The reference adds epsilons (1e-6, 1e-8) to some denominators; ecellm divides exactly and returns 0.0 where a
denominator is zero. Paper-compatible figures agree with the reference to about 1e-6, except QPR: its NDCG divides
by (ideal DCG + 1e-6), and a record whose predicted items with a gain are all labelled C has an ideal DCG of
2**0.01 - 1 = 0.00696, so the epsilon lowers the reference's NDCG by up to 1e-6 / 0.00696 = 1.44e-4 per record (an
exhaustive comparison over every labelling of 1-4 options and every predicted ranking measured at most 1.4375e-4),
and the mean by at most as much.
"""

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from .tasks import TASK_BY_ABBR, task_abbr, task_info  # noqa: F401 (task_abbr: also public here)

# ESCI label -> gain, as the reference QPR evaluation maps them.
QPR_GAINS = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}



class TokenEncoder(Protocol):
    """What AG's BERTScore needs from an encoder (the hook that chooses it): ``ModelEncoder`` (the evaluated model's
    own final hidden states, where no other encoder is at hand) and ``ecellm.models.encoders.BertTokenEncoder`` (a
    real BERT, all-MiniLM-L6-v2 by ``minilm_encoder()``) implement it.

    A plain ``texts -> embeddings`` callable also serves (no special rows, no idf, named by its ``__name__``).

    Attributes:
        name: how results name the encoder (``score``'s ``"encoder"`` field), e.g. ``"all-MiniLM-L6-v2/L6"``.
        special_ids: token ids whose rows are matched against but weigh 0 (BERT's [CLS] and [SEP]).
    """

    name: str
    special_ids: frozenset[int]

    def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text``, one per row that ``__call__`` returns for it."""

    def __call__(self, texts: list[str]) -> list[torch.Tensor]:
        """One (T_i, D) tensor of token embeddings per text."""


def score(
    task: str,
    predictions: Sequence[str],
    references: Sequence,
    *,
    setting: str | None = None,
    ood: bool | None = None,
    paper_compat: bool = False,
    ave_parser: str = "json",
    encoder: TokenEncoder | None = None,
    idf: bool = False,
) -> dict:
    """Score one task's predictions as the paper does.

    Args:
        task: task abbreviation, data name or the reference's misspelling (see ``ecellm.tasks.task_info``).
        predictions: generated responses, one per record.
        references: gold answers aligned with ``predictions``: the records' ``output`` strings, except for QPR,
            whose references are dicts ``{"ranking": "C,B,A", "labels": ["I", "S", "E"]}`` (see ``score_qpr``).
        setting: the records' setting, e.g. ``"OOD_Diverse_Instruction"``; as in the reference, a setting whose name
            contains ``"OOD"`` turns on AVE's relaxed matching. Other tasks ignore it.
        ood: alternative to ``setting``: True turns on the relaxed OOD rules. Must agree with ``setting`` if both
            are given.
        paper_compat: reproduce the reference evaluation's defects (see the module docstring).
        ave_parser: AVE only: ``"json"`` (evaluate.py) or ``"t5"`` (evaluate_T5.py, for Flan-T5, whose vocabulary
            has no braces; see ``parse_ave_t5``).
        encoder: AG only, required there: the BERTScore ``TokenEncoder``, e.g.
            ``ecellm.models.encoders.minilm_encoder()`` or ``ModelEncoder(model, tokenizer)``.
        idf: AG only: weight BERTScore tokens by idf over the references (off by default, as in the paper).

    Returns:
        dict with ``task`` (abbreviation), ``metric`` (the key of the primary figure), the primary and secondary
        figures, ``n`` and ``n_failed`` (AG also ``encoder``: the BERTScore encoder's name).
    Raises:
        ValueError: unknown task, lists of different lengths or empty lists.
    """
    info = task_info(task)
    abbr = info.abbr
    _check_inputs(abbr, predictions, references)
    ood = _is_ood(abbr, setting, ood)
    if info.answer == "yes_no":
        result = score_yes_no(predictions, references, paper_compat=paper_compat)
    elif info.answer == "option":
        result = score_multiple_choice(predictions, references, metric=info.metric, paper_compat=paper_compat)
    elif info.answer == "letter":
        result = score_sr(predictions, references, paper_compat=paper_compat)
    elif info.answer == "ranking":
        result = score_qpr(predictions, references, paper_compat=paper_compat)
    elif info.answer == "triples":
        result = score_ave(predictions, references, ood=ood, paper_compat=paper_compat, parser=ave_parser)
    else:
        if encoder is None:
            raise ValueError(f"{abbr}: BERTScore needs an encoder, e.g. encoder=ModelEncoder(model, tokenizer)")
        result = score_ag(predictions, references, encoder, idf=idf)
    return {"task": abbr, **result}


def _check_inputs(abbr: str, predictions: Sequence[str], references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{abbr}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError(f"{abbr}: no predictions to score; a metric over 0 records is undefined, not 0")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"{abbr}: prediction {i} is {type(p).__name__}, expected str")


def _is_ood(abbr: str, setting: str | None, ood: bool | None) -> bool:
    """Whether the relaxed OOD rules apply: the setting's name contains "OOD", or `ood` says so."""
    if setting is None:
        return bool(ood)
    if ood is not None and ood != ("OOD" in setting):
        raise ValueError(f"{abbr}: ood={ood} contradicts setting {setting!r}")
    return "OOD" in setting


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return _div(2 * p * r, p + r)


def _check_choice(ref, i: int, valid: str | set[str], what: str) -> str:
    if not isinstance(ref, str) or ref not in valid:
        raise ValueError(f"reference {i} is {ref!r}, expected {what}")
    return ref


# ----------------------------------------------------------------------------------------------------- yes / no
def score_yes_no(predictions: Sequence[str], references: Sequence[str], *, paper_compat: bool = False) -> dict:
    """PM, PSI, AP: F1 with positive class ``yes``, plus accuracy, precision, recall, specificity and NPV.

    A prediction is valid when ``prediction.lower().strip()`` is exactly ``yes`` or ``no``; anything else is failed.
    Default: a failed output is a wrong answer (it is in the accuracy denominator, misses a gold ``yes`` in recall
    and a gold ``no`` in specificity, but predicts neither class, so precision and NPV do not see it).
    ``paper_compat``: failed outputs are dropped before scoring, as the reference does.

    Args:
        predictions: generated responses.
        references: gold ``yes`` / ``no`` (compared after ``lower().strip()``).
    """
    gold = [_check_choice(r.lower().strip() if isinstance(r, str) else r, i, {"yes", "no"}, "'yes' or 'no'")
            for i, r in enumerate(references)]
    parsed = [p.lower().strip() for p in predictions]
    parsed = [p if p in ("yes", "no") else None for p in parsed]
    n_failed = sum(p is None for p in parsed)
    pairs = [(g, p) for g, p in zip(gold, parsed) if p is not None or not paper_compat]
    count = Counter(pairs)
    tp, tn = count["yes", "yes"], count["no", "no"]
    pred_yes, pred_no = tp + count["no", "yes"], tn + count["yes", "no"]
    gold_yes = sum(g == "yes" for g, _ in pairs)
    gold_no = len(pairs) - gold_yes
    precision, recall = _div(tp, pred_yes), _div(tp, gold_yes)
    return {
        "metric": "f1",
        "f1": _f1(precision, recall),
        "accuracy": _div(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "specificity": _div(tn, gold_no),
        "npv": _div(tn, pred_no),
        "n": len(gold),
        "n_failed": n_failed,
    }


# ---------------------------------------------------------------------------------------------- multiple choice
def score_multiple_choice(
    predictions: Sequence[str], references: Sequence[str], *, metric: str = "macro_f1", paper_compat: bool = False
) -> dict:
    """PRP, SA (primary: macro F1) and MPC (primary: accuracy): accuracy and macro precision/recall/F1.

    As the reference: the first character of the stripped prediction must be a letter A-E (for every task, even
    PRP with options A-C), else the output is failed; it is compared with the reference's first character. Macro
    figures average the per-class figures over the classes present among the gold and the valid predicted letters
    (scikit-learn's default label set); a class never predicted has precision 0.
    Default: a failed output is a wrong answer (it lowers accuracy and its gold class's recall). ``paper_compat``:
    failed outputs are dropped before scoring. An empty output is failed in both modes (the reference crashes).

    Args:
        predictions: generated responses, e.g. ``"B: positive"`` or ``"B"``.
        references: gold outputs; only their first character (the option letter) is used.
        metric: the primary figure: ``"macro_f1"`` (PRP, SA) or ``"accuracy"`` (MPC).
    """
    if metric not in ("macro_f1", "accuracy"):
        raise ValueError(f"metric must be 'macro_f1' or 'accuracy', got {metric!r}")
    gold = []
    for i, r in enumerate(references):
        if not isinstance(r, str) or not r:
            raise ValueError(f"reference {i} is {r!r}, expected an option such as 'A' or 'A: ...'")
        gold.append(r[0])
    parsed = [p.strip()[:1] for p in predictions]
    parsed = [p if p and p in "ABCDE" else None for p in parsed]
    n_failed = sum(p is None for p in parsed)
    pairs = [(g, p) for g, p in zip(gold, parsed) if p is not None or not paper_compat]
    classes = sorted({g for g, _ in pairs} | {p for _, p in pairs if p is not None})
    per_class = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in pairs)
        precision = _div(tp, sum(p == c for _, p in pairs))
        recall = _div(tp, sum(g == c for g, _ in pairs))
        per_class.append((precision, recall, _f1(precision, recall)))
    macro = [_div(sum(x[k] for x in per_class), len(per_class)) for k in range(3)]
    return {
        "metric": metric,
        "accuracy": _div(sum(g == p for g, p in pairs), len(pairs)),
        "macro_precision": macro[0],
        "macro_recall": macro[1],
        "macro_f1": macro[2],
        "n": len(gold),
        "n_failed": n_failed,
    }


# ----------------------------------------------------------------------------------------- sequential recommendation
_SR_LETTERS = set(TASK_BY_ABBR["SR"].options)  # A-T


def score_sr(predictions: Sequence[str], references: Sequence[str], *, paper_compat: bool = False) -> dict:
    """SR: HR@1, the fraction of outputs naming the gold item.

    As the reference: the stripped prediction must be exactly one letter A-T (``"A: item ..."`` is failed).
    Default: HR@1 = hits / all outputs. ``paper_compat``: hits / valid outputs.

    Args:
        predictions: generated responses.
        references: gold letters ``A``-``T``.
    """
    gold = [_check_choice(r.strip() if isinstance(r, str) else r, i, _SR_LETTERS, "one letter A-T")
            for i, r in enumerate(references)]
    parsed = [p.strip() for p in predictions]
    parsed = [p if p in _SR_LETTERS else None for p in parsed]
    n_failed = sum(p is None for p in parsed)
    hits = sum(g == p for g, p in zip(gold, parsed))
    return {
        "metric": "hr@1",
        "hr@1": _div(hits, len(gold) - n_failed if paper_compat else len(gold)),
        "n": len(gold),
        "n_failed": n_failed,
    }


# ---------------------------------------------------------------------------------------------- query-product rank
def _dcg(gains: Sequence[float]) -> float:
    return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gains))


def _qpr_gains(ref, i: int) -> dict[str, float]:
    """Option letter -> gain for QPR reference ``i``, checking the gold ranking against the labels."""
    if not isinstance(ref, dict) or set(ref) != {"ranking", "labels"}:
        raise ValueError(f"QPR reference {i} is {ref!r}, expected a dict with keys 'ranking' and 'labels'")
    labels = ref["labels"]
    if not labels or any(label not in QPR_GAINS for label in labels):
        raise ValueError(f"QPR reference {i}: labels {labels!r} must be ESCI labels from {sorted(QPR_GAINS)}")
    gains = {chr(ord("A") + k): QPR_GAINS[label] for k, label in enumerate(labels)}
    ranking = ref["ranking"].strip().split(",")
    if sorted(ranking) != sorted(gains) or any(gains[a] < gains[b] for a, b in zip(ranking, ranking[1:])):
        raise ValueError(f"QPR reference {i}: gold ranking {ref['ranking']!r} does not order the options by "
                         f"their labels {labels!r} (are the labels aligned with the records?)")
    return gains


def score_qpr(predictions: Sequence[str], references: Sequence[dict], *, paper_compat: bool = False) -> dict:
    """QPR: mean NDCG of the predicted rankings, gains from the options' ESCI labels (E=1, S=0.1, C=0.01, I=0).

    As the reference: the stripped prediction is split on ``,``; each piece's first character must be an option
    letter (so ``"A, B"`` fails on ``" B"``), else the piece is skipped and counted in ``n_invalid_items``; the
    remaining items take positions 0, 1, ...; DCG = sum((2**gain - 1) / log2(position + 2)). NDCG is averaged over
    all outputs (an output with no valid item scores 0).
    Default: the ideal DCG sorts all the options' gains, and a repeated letter is skipped as an invalid item.
    ``paper_compat``: the ideal DCG sorts the predicted items' own gains, repeats included (the reference).

    Args:
        predictions: generated rankings such as ``"B,A,C"``.
        references: per record ``{"ranking": gold output, e.g. "C,B,A", "labels": ESCI label of option A, B, ...,
            e.g. ["I", "S", "E"]}``. The dataset records hold only the ranking; the labels are the reference code's
            ``data_label/label.json`` (one list per QPR test record, in order). The ranking is checked against them.
    """
    total, n_failed, n_invalid = 0.0, 0, 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        gains = _qpr_gains(ref, i)
        ranked, seen = [], set()
        for piece in pred.strip().split(","):
            letter = piece[:1]
            if letter not in gains or (letter in seen and not paper_compat):
                n_invalid += 1
                continue
            seen.add(letter)
            ranked.append(gains[letter])
        n_failed += not ranked
        ideal = sorted(ranked if paper_compat else gains.values(), reverse=True)
        total += _div(_dcg(ranked), _dcg(ideal))
    return {
        "metric": "ndcg",
        "ndcg": _div(total, len(references)),
        "n_invalid_items": n_invalid,
        "n": len(references),
        "n_failed": n_failed,
    }


# ---------------------------------------------------------------------------------------- attribute value extraction
_AVE_KEYS = ("attribute", "value", "source")


def _ave_gold(ref, i: int) -> list[dict]:
    items = _parse_json(ref)[1] if isinstance(ref, str) else None
    if not isinstance(items, list) or not all(isinstance(x, dict) and all(k in x for k in _AVE_KEYS) for x in items):
        raise ValueError(f"AVE reference {i} is {ref!r}, expected a JSON list of "
                         "{\"attribute\", \"value\", \"source\"} objects")
    return items


def _ave_exact(pred, gold: dict) -> bool:
    return isinstance(pred, dict) and all(k in pred and pred[k] == gold[k] for k in _AVE_KEYS)


def _ave_relaxed(pred, gold: dict) -> bool:
    """The reference's OOD rule: same attribute, non-null value and source, each a substring of the gold's or
    the other way round."""
    if not (isinstance(pred, dict) and all(k in pred for k in _AVE_KEYS)):
        return False
    value, source = pred["value"], pred["source"]
    if pred["attribute"] != gold["attribute"] or value is None or source is None:
        return False
    pv, gv, ps, gs = str(value), str(gold["value"]), str(source), str(gold["source"])
    return (pv in gv or gv in pv) and (ps in gs or gs in ps)


def _max_matching(edges: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching; ``edges[left]`` lists the right nodes it may match (Kuhn's algorithm)."""
    owner = [-1] * n_right

    def augment(left: int, visited: set[int]) -> bool:
        for right in edges[left]:
            if right not in visited:
                visited.add(right)
                if owner[right] == -1 or augment(owner[right], visited):
                    owner[right] = left
                    return True
        return False

    return sum(augment(left, set()) for left in range(len(edges)))


# Deeper JSON than this is a failed output: Python's parser gives up near depth 1000 with a RecursionError (how near
# depends on the call stack), and str() of a deep value, which the relaxed rule takes, recurses too.
MAX_JSON_DEPTH = 100


def _json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), walked without recursion."""
    depth, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (list, dict)):
            depth = max(depth, level + 1)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth


def _parse_json(text: str) -> tuple[bool, object]:
    """``(True, json.loads(text))``, or ``(False, None)`` when the text is not JSON or nests deeper than
    ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False, None
    return (True, value) if _json_depth(value) <= MAX_JSON_DEPTH else (False, None)


def parse_ave_json(text: str) -> list | None:
    """evaluate.py's AVE parser (line 37-47): the output as JSON, ``[]`` when that is not a list, None (failed)
    when it is not JSON or nests deeper than ``MAX_JSON_DEPTH`` (where the reference crashes or recurses).

    Args:
        text: a generated response.
    """
    valid, items = _parse_json(text)
    if not valid:
        return None
    return items if isinstance(items, list) else []


def parse_ave_t5(text: str, *, paper_compat: bool = False) -> list | None:
    """evaluate_T5.py's AVE parser (``process_pred``, line 32-46), for Flan-T5: its vocabulary has no ``{`` or ``}``,
    so its outputs read ``["attribute": "Color", "value": "red", "source": "title", "attribute": ...]``.

    The brackets ``[`` ``]`` are removed, the text is split on ``, "attribute"``, each piece gets back a leading
    ``"attribute"`` (when it lacks one) and braces, and is parsed as a JSON object; pieces that do not parse are
    left out. An output with braces does not parse (the pieces then hold them twice), as in the reference.
    Default: every piece that parses is an item. ``paper_compat``: only the last piece counts (the reference's
    ``if res != ''`` sits after its loop, by an indentation slip).

    Args:
        text: a generated response.
    Returns:
        the items, or None (failed) when none parses (the reference's ``#invalid``).
    """
    items = []
    for piece in text.replace("[", "").replace("]", "").split(', "attribute"'):
        if not piece.startswith('"attribute"'):
            piece = '"attribute"' + piece
        items.append(_parse_json("{" + piece + "}")[1])
    items = [item for item in (items[-1:] if paper_compat else items) if item is not None]
    return items or None


def score_ave(
    predictions: Sequence[str], references: Sequence[str], *, ood: bool = False, paper_compat: bool = False,
    parser: str = "json",
) -> dict:
    """AVE: F1 over (attribute, value, source) triples, with precision and recall pooled over all records.

    As the reference: each prediction is parsed (``parse_ave_json``, or ``parse_ave_t5`` for Flan-T5); a failed
    output counts as an empty list. A predicted item hits a gold triple when it is a dict with equal attribute,
    value and source; with ``ood`` a relaxed hit also counts (``_ave_relaxed``). recall = hits / gold triples;
    precision = hits / predicted items that have an ``attribute``; F1 from those.
    Default: hits are the size of a maximum one-to-one matching between predicted items and gold triples, and an
    item counts for precision when it is a dict with an ``attribute`` key.
    ``paper_compat``: every matching (gold, predicted) pair is a hit, so duplicates count again; an item counts for
    precision when ``"attribute" in item`` (true also for a string containing the word).

    Args:
        predictions: generated responses, JSON lists (or Flan-T5's brace-less lists).
        references: gold outputs, JSON lists of ``{"attribute", "value", "source"}``.
        ood: accept the relaxed OOD match (the reference does when the setting name contains ``OOD``).
        parser: ``"json"`` (evaluate.py) or ``"t5"`` (evaluate_T5.py).
    """
    if parser not in ("json", "t5"):
        raise ValueError(f"AVE: unknown parser {parser!r}; expected 'json' or 't5'")
    hits = n_gold = n_pred = n_failed = 0
    for i, (text, ref) in enumerate(zip(predictions, references)):
        gold = _ave_gold(ref, i)
        items = parse_ave_t5(text, paper_compat=paper_compat) if parser == "t5" else parse_ave_json(text)
        if items is None:
            items, n_failed = [], n_failed + 1
        edges = [[k for k, g in enumerate(gold) if _ave_exact(p, g) or (ood and _ave_relaxed(p, g))] for p in items]
        if paper_compat:
            hits += sum(len(e) for e in edges)
            n_pred += sum(isinstance(p, (dict, list, str)) and "attribute" in p for p in items)
        else:
            hits += _max_matching(edges, len(gold))
            n_pred += sum(isinstance(p, dict) and "attribute" in p for p in items)
        n_gold += len(gold)
    precision, recall = _div(hits, n_pred), _div(hits, n_gold)
    return {
        "metric": "f1",
        "f1": _f1(precision, recall),
        "precision": precision,
        "recall": recall,
        "n": len(references),
        "n_failed": n_failed,
    }


# --------------------------------------------------------------------------------------------- answer generation
def score_ag(
    predictions: Sequence[str], references: Sequence[str], encoder: TokenEncoder, *, idf: bool = False
) -> dict:
    """AG: mean BERTScore F (primary), P and R, and mean ROUGE-L F; ``encoder`` names the BERTScore encoder.

    The paper's F_BERT used roberta-large (``bert_score``, English, no baseline rescaling); ``encoder`` is a
    different model (all-MiniLM-L6-v2's last layer (6) by ``ecellm.models.encoders.minilm_encoder``, or the evaluated
    model's own states by ``ModelEncoder``), so absolute values differ from the paper's and only compare between
    runs with the same encoder, which the result names. The paper's second score, BLEURT, is not computed.
    Nothing is parsed; ``n_failed`` counts empty and whitespace-only outputs, which score 0 on every figure (an
    encoder may still give whitespace a token). Text that is not valid Unicode (lone surrogates, e.g. from a JSON
    file) is encoded with those characters as ``?``.

    Args:
        predictions: generated answers.
        references: gold answers.
        encoder: a ``TokenEncoder`` (see ``bertscore``).
        idf: idf-weight the BERTScore tokens (needs ``encoder.tokenize``).
    """
    for i, r in enumerate(references):
        if not isinstance(r, str):
            raise ValueError(f"AG reference {i} is {r!r}, expected a string")
    predictions = [p.encode("utf-8", "replace").decode("utf-8") for p in predictions]
    references = [r.encode("utf-8", "replace").decode("utf-8") for r in references]
    answered = [bool(p.strip()) for p in predictions]
    bs = bertscore(predictions, references, encoder, idf=idf)
    n = len(references)

    def mean(values) -> float:
        return _div(sum(v for v, ok in zip(values, answered) if ok), n)

    return {
        "metric": "f_bert",
        "encoder": getattr(encoder, "name", getattr(encoder, "__name__", type(encoder).__name__)),
        "f_bert": mean(bs["f"]),
        "p_bert": mean(bs["p"]),
        "r_bert": mean(bs["r"]),
        "rouge_l": mean(rouge_l(p, r) for p, r in zip(predictions, references)),
        "n": n,
        "n_failed": answered.count(False),
    }


def bertscore(
    predictions: Sequence[str], references: Sequence[str], encoder: TokenEncoder, *, idf: bool = False
) -> dict[str, list[float]]:
    """BERTScore (Zhang et al., 2020) of each prediction against its reference, over any token encoder.

    Token embeddings are L2-normalised; each reference token is matched greedily to its most similar prediction
    token (recall) and each prediction token to its most similar reference token (precision); P and R are weighted
    means over the tokens, F = 2PR / (P + R). Rows whose token is in ``encoder.special_ids`` are matched against but
    weigh 0 (bert_score does so for [CLS] and [SEP]); the others weigh 1, or with ``idf`` log((M + 1) / (df + 1)),
    df = the number of the M references containing the token (as bert_score; a token in no reference weighs
    log(M + 1)). No baseline rescaling. A text whose tokens all weigh 0 scores 0.

    Args:
        predictions: candidate texts.
        references: reference texts, aligned with ``predictions``.
        encoder: a ``TokenEncoder`` (embeddings and token ids, row for row), or a plain ``texts -> embeddings``
            callable (no special rows; no ``idf``).
        idf: weight tokens by inverse document frequency over ``references`` (off by default, as in the paper).

    Returns:
        ``{"p": [...], "r": [...], "f": [...]}``, one value per pair.
    """
    pred_emb, ref_emb = encoder(list(predictions)), encoder(list(references))
    if len(pred_emb) != len(predictions) or len(ref_emb) != len(references):
        raise ValueError(f"encoder returned {len(pred_emb)} and {len(ref_emb)} embeddings for "
                         f"{len(predictions)} predictions and {len(references)} references")
    special = getattr(encoder, "special_ids", frozenset())
    if idf or special:
        if not hasattr(encoder, "tokenize"):
            raise ValueError("idf=True or special_ids need an encoder with a tokenize(text) method")
        pred_tok, ref_tok = [encoder.tokenize(t) for t in predictions], [encoder.tokenize(t) for t in references]
    else:  # every row weighs 1: the tokens are not needed
        pred_tok, ref_tok = [[None] * e.shape[0] for e in pred_emb], [[None] * e.shape[0] for e in ref_emb]
    df = Counter(tok for toks in ref_tok for tok in set(toks)) if idf else None

    def weights(toks: list, emb: torch.Tensor) -> torch.Tensor:
        if len(toks) != emb.shape[0]:
            raise ValueError(f"encoder.tokenize gave {len(toks)} tokens for {emb.shape[0]} embedding rows")
        m = len(references)
        return torch.tensor([0.0 if t in special else math.log((m + 1) / (df[t] + 1)) if idf else 1.0
                             for t in toks])

    out = {"p": [], "r": [], "f": []}
    for c, r, tc, tr in zip(pred_emb, ref_emb, pred_tok, ref_tok):
        wc, wr = weights(tc, c), weights(tr, r)  # (Tc,), (Tr,)
        if not (wc.sum() > 0 and wr.sum() > 0):
            p = rec = 0.0
        else:
            sim = F.normalize(c.float(), dim=-1) @ F.normalize(r.float(), dim=-1).T  # (Tc, Tr)
            p = float((sim.max(dim=1).values * wc).sum() / wc.sum())
            rec = float((sim.max(dim=0).values * wr).sum() / wr.sum())
        out["p"].append(p)
        out["r"].append(rec)
        out["f"].append(_f1(p, rec))
    return out


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair: the longest common subsequence of their words (lower-cased; runs of characters other
    than a-z and 0-9 separate words, as ``rouge_score``'s default tokenizer without stemming), P = LCS / prediction
    words, R = LCS / reference words, F = 2PR / (P + R).

    Args:
        prediction: candidate text.
        reference: reference text.
    """
    a, b = _rouge_tokens(prediction), _rouge_tokens(reference)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return _f1(_div(lcs, len(a)), _div(lcs, len(b)))


class ModelEncoder:
    """BERTScore encoder from an ecellm model: the final hidden states (after the final norm) of each token.

    Decoder models give ``model.hidden_states`` (causal: a token's embedding sees only the tokens before it);
    encoder-decoder models (T5) give their encoder's output ``model.encode`` (bidirectional). Each text is encoded
    with the family's BOS (when it has one) and without EOS; the BOS row is left out of the returned embeddings
    (so no row is special). These embeddings are not roberta-large's 17th layer, which the paper used, and the
    untuned model's own states hardly tell a good answer from a constant one (docs/evaluation.md): prefer
    ``ecellm.models.encoders.minilm_encoder()``; this encoder stays for the comparison where no other is at hand.

    Args:
        model: an ecellm model exposing ``hidden_states(input_ids, attention_mask) -> (B, T, H)`` (decoders) or
            ``encode(input_ids, attention_mask) -> (B, T, H)`` (T5).
        tokenizer: its ecellm tokenizer (``encode``, ``bos_id``, ``pad_id``).
        batch_size: texts per forward pass.
        max_length: texts are cut to this many tokens (BOS included).
        name: how results name the encoder.
    """

    special_ids: frozenset[int] = frozenset()

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 512,
                 name: str = "evaluated-model"):
        self.embed = getattr(model, "hidden_states", None) or getattr(model, "encode", None)
        if self.embed is None:
            raise TypeError(f"{type(model).__name__} has neither hidden_states(input_ids, attention_mask) nor "
                            "encode(input_ids, attention_mask)")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.bos = tokenizer.bos_id is not None
        self.name = name

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` that get an embedding row (no BOS), cut to ``max_length``.

        Args:
            text: the text.
        """
        return self.tokenizer.encode(text, bos=False, eos=False)[: self.max_length - self.bos]

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[torch.Tensor]:
        """Embed ``texts``; returns one float32 CPU tensor (T_i, H) per text.

        Args:
            texts: the texts.
        """
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = [[self.tokenizer.bos_id] * self.bos + self.tokenize(t) for t in texts[start:start + self.batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)  # (B, T)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)  # (B, T)
            hidden = self.embed(input_ids, mask)  # (B, T, H)
            out.extend(hidden[b, self.bos:len(x)].float().cpu() for b, x in enumerate(ids))
        return out
