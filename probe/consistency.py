"""ParaRel consistency (Elazar et al., 2021): do a relation's paraphrased patterns give the same top-1 answer?

Knows nothing of models: it reads ParaRel's entailment graphs (JSONL edges) and facts, and computes the figures
from a table of top-1 predictions (pattern -> subject -> answer), as ParaRel's `analyze_results` and its
LAMA/group scores count them:

- per subject, the gold object is that of the subject's last fact row (ParaRel keys its table by subject);
- a pattern whose word before [Y] is "a" while the gold starts with a vowel, or "an" while it does not, is left out
  for that subject (the a/an filter), as the source pattern of an edge and as its target;
- `consistency`: the share of edges (ordered pattern pairs of the graph), over subjects, whose two patterns give the
  same answer; by edge type: syntactic only, lexical only, both (edges with a determiner change count only overall);
- `lama_acc`: the first pattern's accuracy over the fact rows; `group_acc`: rows every pattern gets right;
  `group_unacc`: rows where every pattern gives the same wrong answer (no a/an filter in these three);
- `consistent_subjects`: subjects whose unfiltered patterns all give one answer;
- `knowledgeable_consistency` / `unknowledgeable_consistency`: consistency over the subjects that at least one
  unfiltered pattern gets right / that none does.

Figures are in percent; one whose count is zero is None (ParaRel writes -1 or 0 there).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from probe.data import Fact, read_jsonl
from probe.errors import DataError

EDGE_KINDS = ("syntactic", "lexical", "both", "none")
PARAREL_FACTS = Path("extras/pararel_trex_lms_vocab")  # ParaRel's facts, inside a LAMA folder
PARAREL_SPLIT = "pararel"
_VOWELS = ("a", "e", "i", "o", "u")


@dataclass(frozen=True)
class Edge:
    """An entailment edge of a relation's pattern graph: `source` entails `target`, with the kind of change."""

    source: str
    target: str
    syntactic: bool
    lexical: bool
    determiner: bool

    @property
    def kind(self) -> str | None:
        """syntactic, lexical, both or none (no change); None for an edge that changes a determiner."""
        if self.determiner:
            return None
        return {(True, False): "syntactic", (False, True): "lexical", (True, True): "both"}.get(
            (self.syntactic, self.lexical), "none")


def read_graph(path: Path) -> list[Edge]:
    """A graph file: one {"from", "to", "syntactic_change", "lexical_change", "determiner_change"} a line."""
    if not path.is_file():
        raise DataError(f"graph file {path} not found: expected JSONL edges (from, to, syntactic_change, "
                        "lexical_change, determiner_change)")
    edges = []
    for i, row in read_jsonl(path):
        flags = [row.get(k) for k in ("syntactic_change", "lexical_change", "determiner_change")]
        if not all(isinstance(row.get(k), str) for k in ("from", "to")) or not all(isinstance(f, bool) for f in flags):
            raise DataError(f"{path}:{i}: expected 'from' and 'to' patterns and true/false syntactic_change, "
                            "lexical_change and determiner_change")
        edges.append(Edge(row["from"].strip(), row["to"].strip(), *flags))
    return edges


def relation_graph(folder: Path, rid: str, patterns: list[str]) -> list[Edge]:
    """A relation's edges from `folder/<rid>.jsonl`, each end checked against the relation's patterns."""
    path = folder / f"{rid}.jsonl"
    edges = read_graph(path)
    known = set(patterns)
    for e in edges:
        for end in (e.source, e.target):
            if end not in known:
                raise DataError(f"{path}: pattern {end!r} is not one of the prompts file's patterns of {rid}")
    return edges


def default_graphs(prompts_file: Path) -> Path:
    """Where the graphs are by default: `<prompts folder>_graphs` beside it (prompts/pararel_graphs)."""
    prompts_file = Path(prompts_file)
    return prompts_file.with_name(prompts_file.name + "_graphs")


def read_fact_rows(path: Path) -> list[Fact]:
    """ParaRel's facts file: every (sub_label, obj_label) row, repeated rows kept (ParaRel counts rows)."""
    rows = []
    for i, row in read_jsonl(path):
        sub, obj = row.get("sub_label"), row.get("obj_label")
        if not isinstance(sub, str) or not isinstance(obj, str) or not sub.strip() or not obj.strip():
            raise DataError(f"{path}:{i}: expected non-empty 'sub_label' and 'obj_label' strings")
        rows.append(Fact(sub, obj))
    return rows


def a_an_mismatch(pattern: str, gold: str) -> bool:
    """ParaRel's filter: the word before [Y] is 'a' and the gold starts with a vowel, or 'an' and it does not."""
    words = pattern.split(" ")
    at = [i for i, w in enumerate(words) if "[Y]" in w]
    if len(at) != 1 or at[0] == 0:
        return False
    vowel = gold.lower().startswith(_VOWELS)
    before = words[at[0] - 1]
    return (before == "a" and vowel) or (before == "an" and not vowel)


def _share(hits: int, total: int) -> float | None:
    return 100.0 * hits / total if total else None


def gold_by_subject(rows: list[Fact]) -> dict[str, str]:
    """Subject -> gold object of its last row, subjects in the order they first appear."""
    gold: dict[str, str] = {}
    for f in rows:
        gold[f.sub] = f.obj
    return gold


def consistency_metrics(patterns: list[str], edges: list[Edge], rows: list[Fact],
                        top1: dict[str, dict[str, str]]) -> dict:
    """ParaRel's figures for one relation from the top-1 answer of each pattern (in order, the first being LAMA's)
    for each subject of `rows` (the fact rows, in file order); `edges` among `patterns` only."""
    gold = gold_by_subject(rows)
    out_edges: dict[str, list[Edge]] = {p: [] for p in patterns}
    for e in edges:
        out_edges[e.source].append(e)
    hits, totals = Counter(), Counter()
    answers: dict[str, list[str]] = {s: [] for s in gold}
    right: Counter = Counter()
    per_subject: dict[str, list[bool]] = {}
    for p in patterns:
        for s, obj in gold.items():
            if a_an_mismatch(p, obj):
                continue
            pred = top1[p][s]
            right[s] += pred == obj
            answers[s].append(pred)
            for e in out_edges[p]:
                if a_an_mismatch(e.target, obj):
                    continue
                same = pred == top1[e.target][s]
                per_subject.setdefault(s, []).append(same)
                for key in ("all", e.kind):
                    if key is not None:
                        hits[key] += same
                        totals[key] += 1
    answered = {s: a for s, a in answers.items() if a}
    known = [x for s, xs in per_subject.items() if right[s] > 0 for x in xs]
    unknown = [x for s, xs in per_subject.items() if right[s] == 0 for x in xs]
    first = top1[patterns[0]]
    every = [all(top1[p][f.sub] == f.obj for p in patterns) for f in rows]
    agreed = [len({top1[p][f.sub] for p in patterns}) == 1 and first[f.sub] != f.obj for f in rows]
    metrics = {
        "consistency": _share(hits["all"], totals["all"]),
        **{f"{k}_consistency": _share(hits[k], totals[k]) for k in EDGE_KINDS},
        "lama_acc": _share(sum(first[f.sub] == f.obj for f in rows), len(rows)),
        "group_acc": _share(sum(every), len(rows)),
        "group_unacc": _share(sum(agreed), len(rows)),
        "consistent_subjects": _share(sum(len(set(a)) == 1 for a in answered.values()), len(answered)),
        "knowledgeable_consistency": _share(sum(known), len(known)),
        "unknowledgeable_consistency": _share(sum(unknown), len(unknown)),
        "n_pairs": totals["all"], **{f"n_{k}_pairs": totals[k] for k in EDGE_KINDS},
        "n_subjects": len(gold), "n_rows": len(rows), "n_patterns": len(patterns), "n_edges": len(edges),
    }
    return metrics


def majority(answers: list[str]) -> str:
    """The answer most patterns give; a tie goes to the one the earliest pattern gave."""
    return Counter(answers).most_common(1)[0][0]


def prompt_metrics(patterns: list[str], rows: list[Fact], top1: dict[str, dict[str, str]],
                   prompt: dict[str, str]) -> dict:
    """A trained prompt as one more node: its accuracy over the rows, its agreement with each pattern (over the
    subjects the a/an filter keeps for that pattern), and with the patterns' majority answer on the subjects where the
    patterns all agree and on those where they do not."""
    gold = gold_by_subject(rows)
    by_pattern: dict[str, float | None] = {}
    same_all = total_all = 0
    agree = {True: [0, 0], False: [0, 0]}
    for p in patterns:
        kept = [s for s, obj in gold.items() if not a_an_mismatch(p, obj)]
        same = sum(prompt[s] == top1[p][s] for s in kept)
        by_pattern[p] = _share(same, len(kept))
        same_all, total_all = same_all + same, total_all + len(kept)
    for s, obj in gold.items():
        answers = [top1[p][s] for p in patterns if not a_an_mismatch(p, obj)]
        if answers:
            tally = agree[len(set(answers)) == 1]
            tally[0] += prompt[s] == majority(answers)
            tally[1] += 1
    return {
        "prompt_acc": _share(sum(prompt[f.sub] == f.obj for f in rows), len(rows)),
        "prompt_agreement": _share(same_all, total_all),
        "prompt_agreement_by_pattern": by_pattern,
        "prompt_majority_agreement_consistent": _share(*agree[True]),
        "prompt_majority_agreement_inconsistent": _share(*agree[False]),
        "n_subjects_consistent": agree[True][1], "n_subjects_inconsistent": agree[False][1],
    }


MACRO_KEYS = ("consistency", *(f"{k}_consistency" for k in EDGE_KINDS), "lama_acc", "group_acc", "group_unacc",
              "consistent_subjects", "knowledgeable_consistency", "unknowledgeable_consistency", "prompt_acc",
              "prompt_agreement", "prompt_majority_agreement_consistent", "prompt_majority_agreement_inconsistent")


def macro(rows: list[dict]) -> dict:
    """The mean over relations of each figure, over the relations where it is defined (with their count)."""
    out: dict = {}
    for key in MACRO_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
            out[f"{key}_relations"] = len(values)
    return out
