"""A pragmatic PromQL reader: the metric selectors (name + label matchers) and the label
names of `by` / `without` / `on` / `ignoring` / `group_left` / `group_right` lists of an
expression. Not a full parser: enough to check that what dashboards, rules and
autoscalers query exists (tests/ops/test_metrics_contract.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""
     (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[{}(),=<>+\-*/^%@])
    |(?P<ws>\s+)
    """,
    re.VERBOSE,
)
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile", "limitk", "limit_ratio"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"} | _LABEL_LISTS | _AGGREGATIONS


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class Parsed:
    selectors: list[Selector]
    grouping_labels: set[str]


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 30]!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup or "", m.group()))
    return out


def _unquote(s: str) -> str:
    return s[1:-1].encode().decode("unicode_escape") if s[0] in "\"'" else s[1:-1]


def parse(expr: str) -> Parsed:
    toks = tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0

    def matchers_from(j: int) -> tuple[list[tuple[str, str, str]], int]:
        found: list[tuple[str, str, str]] = []
        assert toks[j][1] == "{"
        j += 1
        while toks[j][1] != "}":
            if toks[j][1] == ",":
                j += 1
                continue
            label, op, value = toks[j][1], toks[j + 1][1], toks[j + 2]
            if value[0] != "str" or op not in ("=", "!=", "=~", "!~"):
                raise ValueError(f"bad matcher near {label!r} in {expr!r}")
            found.append((label, op, _unquote(value[1])))
            j += 3
        return found, j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in _LABEL_LISTS and nxt == "(":
            j = i + 2
            while toks[j][1] != ")":
                if toks[j][0] == "ident":
                    grouping.add(toks[j][1])
                j += 1
            i = j + 1
        elif kind == "ident" and nxt == "(":
            i += 1  # a function or an aggregation
        elif kind == "ident" and text not in _KEYWORDS:
            sel = Selector(text)
            i += 1
            if nxt == "{":
                sel.matchers, i = matchers_from(i)
            selectors.append(sel)
        elif text == "{":  # a selector without a metric name
            matchers, i = matchers_from(i)
            name = next((v for lab, op, v in matchers if lab == "__name__" and op == "="), "")
            selectors.append(Selector(name, [m for m in matchers if m[0] != "__name__"]))
        else:
            i += 1
    return Parsed(selectors, grouping)


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend or ""))


def regex_alternatives(value: str) -> list[str]:
    """`A|B|C` -> [A, B, C] for plain alternations; [] when the regex is more than that."""
    if re.fullmatch(r"[A-Za-z0-9_.:\-]+(\|[A-Za-z0-9_.:\-]+)*", value):
        return value.split("|")
    return []
