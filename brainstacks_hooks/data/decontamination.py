"""Cross-domain leak detection and benchmark decontamination.

Two checks, both wired into data preparation (the reference implementation defined the keyword check
but never called it; ``reference_impl.md`` sections 4.6 and 11.1 item 10):

1. **Evaluation overlap.** A training row is dropped when it contains at least
   ``ngram_overlap_threshold`` of the distinct word ``ngram``-grams of any evaluation question.
   N-grams found in more than ``boilerplate_max_questions`` questions are ignored as boilerplate.
   Questions shorter than ``ngram`` words are matched exactly (normalised text) against the row's
   instruction, and against instruction + input.
2. **Keyword leaks** (paper sections 3.4 and 7.1). A row's score for a domain is the number of distinct
   keywords of that domain found in it (whole-word matches for plain words, substring matches for
   symbols such as ``print(``). A row of domain D is a leak into X when X has the highest score (ties go
   to D itself, then to the earlier domain in ``keywords``), that score is at least
   ``min_keyword_hits`` and it beats D's own score. ``policy`` then reassigns, drops or keeps it.
   By default only the general ``chat`` domain is checked: on the shipped data, checking curated domains
   mostly flags topic words (a LogiQA passage about a doctor, a CodeAlpaca "average" function, PubMedQA
   statistics) rather than real leaks.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ..utils.logging import get_logger

logger = get_logger(__name__)

Policy = Literal["reassign", "drop", "keep"]

DEFAULT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "code": (
        "python", "javascript", "java", "c++", "sql", "html", "css", "def ", "import ", "print(", "return ",
        ".append(", "for i in", "range(", "elif ", "lambda", "self.", "function", "algorithm", "array",
        "compile", "syntax", "api", "json", "regex", "boolean", "recursion", "source code", "snippet",
        "programming", "string", "class ",
    ),
    "math": (
        "solve", "equation", "calculate", "how many", "how much", "sum of", "product of", "percent",
        "fraction", "sqrt", "π", "x =", "divisible", "remainder", "probability", "derivative", "integral",
        "polynomial", "area of", "perimeter", "average", "ratio", "####", "<<", "total", "per hour",
    ),
    "medical": (
        "patient", "symptom", "symptoms", "diagnosis", "diagnosed", "treatment", "disease", "clinical",
        "dose", "dosage", "insulin", "immune", "infection", "chronic", "syndrome", "therapy", "physician",
        "hospital", "blood pressure", "medication", "prescribed", "tumor", "cancer", "virus", "bacteria",
        "surgery", "mg", "antibiotic", "vaccine", "pathology", "lesion",
    ),
}  # fmt: skip

_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class DecontaminationConfig:
    """Settings of :func:`decontaminate`.

    ``check_domains`` limits the keyword check to rows of those domains (``None``: every domain);
    ``keywords`` maps a target domain to its keyword list (order breaks ties).
    """

    enabled: bool = True
    policy: Policy = "reassign"
    min_keyword_hits: int = 3
    ngram: int = 13
    ngram_overlap_threshold: float = 0.5
    boilerplate_max_questions: int = 5
    check_domains: tuple[str, ...] | None = ("chat",)
    keywords: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_KEYWORDS))
    max_examples: int = 5

    def __post_init__(self) -> None:
        if self.policy not in ("reassign", "drop", "keep"):
            raise ConfigError(f"decontamination policy must be reassign, drop or keep, not {self.policy!r}")
        if self.ngram < 1 or not 0.0 < self.ngram_overlap_threshold <= 1.0 or self.min_keyword_hits < 1:
            raise ConfigError("need ngram >= 1, 0 < ngram_overlap_threshold <= 1 and min_keyword_hits >= 1")


@dataclass
class DecontaminationReport:
    """Counts of one :func:`decontaminate` call.

    For each input domain: ``n_read[d] == n_kept[d] + sum(moved "d->x") + sum(dropped[reason][d])``.
    ``n_out[d]`` is the final size of domain ``d`` (kept + moved in). ``flagged`` counts detected leaks
    of every policy (for ``"keep"``, the flagged rows are part of ``n_kept``).
    """

    policy: str = "reassign"
    n_read: dict[str, int] = field(default_factory=dict)
    n_kept: dict[str, int] = field(default_factory=dict)
    n_out: dict[str, int] = field(default_factory=dict)
    moved: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (for the training manifest)."""
        return asdict(self)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _row_text(row: dict[str, Any]) -> str:
    return "\n".join(str(row.get(k) or "") for k in ("instruction", "input", "output"))


class _EvalIndex:
    """Eval questions indexed once: n-gram -> question ids, plus exact texts of short questions."""

    def __init__(self, eval_texts: list[str], n: int, boilerplate_max: int) -> None:
        self.n = n
        postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self.short: set[str] = set()
        grams_per_q: list[set[tuple[str, ...]]] = []
        for q, text in enumerate(eval_texts):
            words = _words(text)
            if len(words) < n:
                if words:
                    self.short.add(" ".join(words))
                grams_per_q.append(set())
                continue
            grams = _ngrams(words, n)
            grams_per_q.append(grams)
            for g in grams:
                postings[g].append(q)
        self.postings = {g: qs for g, qs in postings.items() if len(qs) <= boilerplate_max}
        self.sizes = [sum(1 for g in grams if g in self.postings) for grams in grams_per_q]

    def matches(self, row: dict[str, Any], threshold: float) -> bool:
        instruction = " ".join(_words(str(row.get("instruction") or "")))
        with_input = " ".join(_words(f"{row.get('instruction') or ''} {row.get('input') or ''}"))
        if self.short and (instruction in self.short or with_input in self.short):
            return True
        hits: Counter[int] = Counter()
        for g in _ngrams(_words(_row_text(row)), self.n):
            for q in self.postings.get(g, ()):
                hits[q] += 1
        return any(c >= threshold * self.sizes[q] for q, c in hits.items())


_KW_TOKEN = re.compile(r"\w+")


class KeywordMatcher:
    """Distinct-keyword scores per domain, computed from one tokenization of the text.

    Keywords made of word characters (``"mg"``, ``"def "``, ``"blood pressure"``) match whole words or
    word sequences; others (``"print("``, ``"c++"``, ``"####"``) match as lower-case substrings.
    """

    def __init__(self, keywords: dict[str, tuple[str, ...]]) -> None:
        self.domains = list(keywords)
        self._words: dict[str, set[str]] = {}
        self._phrases: dict[str, set[str]] = {}
        self._subs: dict[str, set[str]] = {}
        for domain, kws in keywords.items():
            words, phrases, subs = set(), set(), set()
            for kw in (k.lower() for k in kws):
                toks = _KW_TOKEN.findall(kw)
                if toks and " ".join(toks) == " ".join(kw.split()):
                    (words if len(toks) == 1 else phrases).add(" ".join(toks))
                else:
                    subs.add(kw)
            self._words[domain], self._phrases[domain], self._subs[domain] = words, phrases, subs

    def scores(self, text: str) -> dict[str, int]:
        """Number of distinct keywords of each domain found in ``text``."""
        low = text.lower()
        toks = _KW_TOKEN.findall(low)
        tok_set = set(toks)
        joined = f" {' '.join(toks)} "
        return {
            d: len(self._words[d] & tok_set)
            + sum(1 for p in self._phrases[d] if f" {p} " in joined)
            + sum(1 for s in self._subs[d] if s in low)
            for d in self.domains
        }


def keyword_scores(text: str, keywords: dict[str, tuple[str, ...]] | None = None) -> dict[str, int]:
    """Number of distinct keywords of each domain (default :data:`DEFAULT_KEYWORDS`) found in ``text``."""
    return KeywordMatcher(keywords if keywords is not None else DEFAULT_KEYWORDS).scores(text)


def detect_leak(row: dict[str, Any], own: str, matcher: KeywordMatcher, min_hits: int) -> str | None:
    """Domain that ``row`` (of domain ``own``) leaks into, or ``None``."""
    scores = matcher.scores(_row_text(row))
    own_score = scores.get(own, 0)
    best, best_score = own, own_score
    for d, s in scores.items():  # keyword order breaks ties among other domains; ``own`` wins ties
        if d != own and s > best_score:
            best, best_score = d, s
    return best if best != own and best_score >= min_hits else None


def decontaminate(
    rows_by_domain: dict[str, list[dict[str, Any]]],
    eval_texts: list[str],
    config: DecontaminationConfig | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], DecontaminationReport]:
    """Drop eval-overlapping rows, then reassign/drop/keep cross-domain keyword leaks.

    Input rows are never mutated; a reassigned row is a copy with ``domain`` set to its new domain and
    ``original_domain`` recording the old one, appended after the target's own rows. A leak into a
    domain that is not in ``rows_by_domain`` is kept in place under ``"reassign"``. Output is a pure
    function of the inputs, so the report reproduces exactly.
    """
    config = config or DecontaminationConfig()
    report = DecontaminationReport(policy=config.policy)
    if not config.enabled:
        out = {d: list(rows) for d, rows in rows_by_domain.items()}
        report.n_read = {d: len(r) for d, r in out.items()}
        report.n_kept, report.n_out = dict(report.n_read), dict(report.n_read)
        return out, report

    index = _EvalIndex(eval_texts, config.ngram, config.boilerplate_max_questions) if eval_texts else None
    matcher = KeywordMatcher(config.keywords)
    checked = set(config.check_domains) if config.check_domains is not None else set(rows_by_domain)
    kept: dict[str, list[dict[str, Any]]] = {d: [] for d in rows_by_domain}
    incoming: dict[str, list[dict[str, Any]]] = {d: [] for d in rows_by_domain}
    dropped: dict[str, Counter[str]] = defaultdict(Counter)
    moved: Counter[str] = Counter()
    flagged: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)

    def note(key: str, row: dict[str, Any]) -> None:
        if len(examples[key]) < config.max_examples:
            examples[key].append(str(row.get("id")))

    for domain, rows in rows_by_domain.items():
        report.n_read[domain] = len(rows)
        for row in rows:
            if index is not None and index.matches(row, config.ngram_overlap_threshold):
                dropped["eval_overlap"][domain] += 1
                note("eval_overlap", row)
                continue
            target = detect_leak(row, domain, matcher, config.min_keyword_hits) if domain in checked else None
            if target is None:
                kept[domain].append(row)
                continue
            key = f"{domain}->{target}"
            flagged[key] += 1
            note(key, row)
            if config.policy == "drop":
                dropped["keyword_leak"][domain] += 1
            elif config.policy == "reassign" and target in incoming:
                moved[key] += 1
                incoming[target].append({**row, "domain": target, "original_domain": domain})
            else:
                kept[domain].append(row)

    out = {d: kept[d] + incoming[d] for d in rows_by_domain}
    report.n_kept = {d: len(kept[d]) for d in rows_by_domain}
    report.n_out = {d: len(out[d]) for d in rows_by_domain}
    report.moved = dict(sorted(moved.items()))
    report.flagged = dict(sorted(flagged.items()))
    report.dropped = {r: dict(sorted(c.items())) for r, c in sorted(dropped.items())}
    report.examples = dict(sorted(examples.items()))
    logger.info("decontamination: moved %s, dropped %s", report.moved, report.dropped)
    return out, report
