"""Turns a vision-language model's free text into a description and keywords.

Qwen-VL usually answers the tutorial prompt as "<description>\\n\\nKeywords: a, b, c", but
real outputs drift: Chinese labels and punctuation (关键词：a，b、c), numbered or bulleted
keyword lists, markdown bold and headings, "Description:" labels, hashtags instead of a
keyword line, polite chatter before and after, keywords missing altogether. The parser
is deliberately forgiving: it never raises, it always returns the raw text, and when it
cannot find keywords it returns none rather than inventing them from the prose.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

__all__ = ["ParsedCaption", "clean_keywords", "limit_words", "parse_caption"]


@dataclass(frozen=True)
class ParsedCaption:
    description: str
    keywords: list[str] = field(default_factory=list)
    raw_text: str = ""


# --- patterns ----------------------------------------------------------------------

_KW_WORDS_EN = r"(?:key[\s-]*words?|keywords?|key\s+terms|tags)"
_KW_WORDS_ZH = r"(?:关键词语?|关键字|标签)"
_KW_WORDS = rf"(?:{_KW_WORDS_EN}|{_KW_WORDS_ZH})"
_DESC_WORDS = r"(?:description|caption|summary|image\s+description|描述|图片描述|图像描述|说明)"
# Optional decorations in front of a label: list numbering, bullets, markdown headings.
_LEAD = r"(?:#{1,6}\s+)?(?:(?:\d+|[a-z])[.)]\s*)?(?:[-*•+]\s+)?"
# "5 keywords", "five keywords", "Keywords (5)".
_COUNT = r"(?:(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|some|the)\s+)?"

# A keyword label followed by a colon (or a dash): may appear in the middle of a line,
# as in the tutorial's "... water marks. Keywords: beach, footprints".
_KW_LABEL_COLON = re.compile(
    rf"(?:(?:^|(?<=[\s.。!?！？)]))(?:{_LEAD}{_COUNT}{_KW_WORDS_EN})|(?:{_LEAD}(?:\d+个)?{_KW_WORDS_ZH}))"
    r"\s*(?:\([^)\n]{0,20}\))?\s*(?::|：|\s[-–—]\s)",
    re.IGNORECASE | re.MULTILINE,
)
# A keyword label alone on its line (a heading such as "### Keywords").
_KW_LABEL_LINE = re.compile(
    rf"^[ \t]*{_LEAD}{_COUNT}{_KW_WORDS}[ \t]*(?:\([^)\n]{{0,20}}\))?[ \t]*$", re.IGNORECASE | re.MULTILINE
)
_DESC_LABEL = re.compile(
    rf"^[ \t]*{_LEAD}{_DESC_WORDS}[ \t]*(?:(?::|：|[-–—])[ \t]*|$)",
    re.IGNORECASE | re.MULTILINE,
)
_LIST_ITEM = re.compile(r"^\s*(?:(?:\d{1,2}|[a-z])[.)、]|[-*•+·▪●]|\(\d{1,2}\))\s*(.+?)\s*$", re.IGNORECASE)
_INLINE_NUMBERING = re.compile(r"(?:^|\s)\d{1,2}[.)、]\s+")
_HASHTAG = re.compile(r"#([^\s#,，、;；.。!?！？:：]+)")
_SPLIT = re.compile(r"\s*(?:,|，|、|;|；|\||｜|/\s)\s*")
_MARKDOWN = re.compile(r"\*\*|__|`+|~~")
_CHATTER_START = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|great|here(?:'s|’s| is| are)|below is|the following|"
    r"i (?:can|will|'ll|would)|let me|好的|当然|以下是|下面是|这是对)",
    re.IGNORECASE,
)
_CHATTER_END = re.compile(
    r"^(?:let me know|i hope|hope this|feel free|if you (?:need|have|want|would)|please let|is there anything|"
    r"would you like|note:|如果您?|希望|请告诉我|还有什么)",
    re.IGNORECASE,
)
_MAX_KEYWORD_CHARS = 60
_MAX_KEYWORD_WORDS = 6


def parse_caption(raw: str, max_keywords: int = 10) -> ParsedCaption:
    """Splits a model answer into (description, keywords); never raises."""
    raw = raw if isinstance(raw, str) else ""
    text = _normalise(raw)
    if not text:
        return ParsedCaption("", [], raw)

    keywords: list[str] = []
    before, after = text, ""
    match = _find_keyword_label(text)
    if match is not None:
        label_start, label_end, inline = match
        before = text[:label_start]
        keywords, after = _take_keyword_block(text[label_end:], inline)
    else:
        tags, before = _take_hashtags(text)
        keywords = tags

    description = _description(before)
    if not description and after:
        # "Keywords: ..." came first and the description follows it.
        description = _description(after)
    return ParsedCaption(description, clean_keywords(keywords, max_keywords), raw)


def clean_keywords(items: list[str], max_keywords: int = 10) -> list[str]:
    """Strips decoration, lower-cases, drops sentences and duplicates; keeps order."""
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        kw = _clean_keyword(item)
        if not kw:
            continue
        key = kw.casefold()
        if key in seen:
            continue
        seen.add(key)
        out.append(kw)
        if len(out) >= max_keywords:
            break
    return out


def limit_words(text: str, max_words: int) -> str:
    """Caps a description at `max_words` words, preferring a sentence boundary.

    Only space-separated scripts are counted; Chinese text (no spaces) is returned as is,
    since a word count is not defined for it without a segmenter.
    """
    words = text.split()
    if max_words <= 0 or len(words) <= max_words:
        return text
    cut = " ".join(words[:max_words])
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    if cut.endswith((".", "!", "?")):
        return cut
    if end >= len(cut) // 2:
        return cut[: end + 1]
    return cut.rstrip(",;:") + "…"


# --- helpers ----------------------------------------------------------------------


def _normalise(raw: str) -> str:
    # NFKC folds full-width forms (：，；) into ASCII; 、 and 。 stay as they are.
    text = unicodedata.normalize("NFKC", raw).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u200b", "").replace("\ufeff", "")
    text = _MARKDOWN.sub("", text)
    return text.strip()


def _find_keyword_label(text: str) -> tuple[int, int, bool] | None:
    """(start, end, keywords-on-the-same-line) of the first keyword label, if any."""
    candidates: list[tuple[int, int, bool]] = []
    m = _KW_LABEL_COLON.search(text)
    if m:
        candidates.append((m.start(), m.end(), True))
    m2 = _KW_LABEL_LINE.search(text)
    if m2:
        candidates.append((m2.start(), m2.end(), False))
    if not candidates:
        return None
    return min(candidates)


def _take_keyword_block(rest: str, inline: bool) -> tuple[list[str], str]:
    """Keywords that follow a label, and the text after them."""
    lines = rest.split("\n")
    first = lines[0].strip() if inline else ""
    body_start = 1 if inline else 0
    if inline and first:
        return _split_line(first), "\n".join(lines[1:])
    # The keywords are on the following lines: a list, or a single comma separated line.
    items: list[str] = []
    i = body_start
    while i < len(lines) and not lines[i].strip():
        i += 1
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            if items:
                break
            i += 1
            continue
        item = _LIST_ITEM.match(line)
        if item:
            items.append(item.group(1))
        elif not items and (_SPLIT.search(line) or _HASHTAG.search(line)):
            items.extend(_split_line(line))
            i += 1
            break
        elif _looks_like_keyword(line):
            items.append(line)
        else:
            break
        i += 1
    return items, "\n".join(lines[i:])


def _split_line(line: str) -> list[str]:
    if len(_HASHTAG.findall(line)) >= 2:
        return [m.group(1).replace("_", " ") for m in _HASHTAG.finditer(line)]
    if len(_INLINE_NUMBERING.findall(line)) >= 2:
        return [p for p in _INLINE_NUMBERING.split(line) if p.strip()]
    return _SPLIT.split(line)


def _looks_like_keyword(line: str) -> bool:
    return len(line) <= _MAX_KEYWORD_CHARS and len(line.split()) <= 4 and not line.endswith((".", "。", "!", "?"))


def _take_hashtags(text: str) -> tuple[list[str], str]:
    """Keywords from a line made mostly of hashtags ("#sunset #ocean"), and the rest."""
    kept, tags = [], []
    for line in text.split("\n"):
        found = _HASHTAG.findall(line)
        residue = _HASHTAG.sub("", line).strip(" ,，、;.。")
        if len(found) >= 2 and len(residue.split()) <= 3 and not tags:
            tags = [t.replace("_", " ") for t in found]
            continue
        kept.append(line)
    return tags, "\n".join(kept)


def _clean_keyword(item: str) -> str:
    kw = unicodedata.normalize("NFKC", item).strip()
    m = _LIST_ITEM.match(kw)
    if m:
        kw = m.group(1)
    kw = kw.lstrip("#").strip()
    # "cat - the main subject", "Cat: a tabby" -> the term before its explanation.
    kw = re.split(r"\s+[-–—]\s+|:\s|：", kw, maxsplit=1)[0]
    kw = kw.strip(" \t\"'“”‘’「」『』《》()（）[]【】<>.。!！?？;；,，、*_`~")
    kw = re.sub(r"^(?:and|or|&|以及|和)\s+", "", kw, flags=re.IGNORECASE)
    kw = re.sub(r"\s+", " ", kw).strip().lower()
    if not kw or len(kw) > _MAX_KEYWORD_CHARS or len(kw.split()) > _MAX_KEYWORD_WORDS:
        return ""
    if not any(ch.isalnum() for ch in kw):
        return ""
    return kw


def _description(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    m = _DESC_LABEL.search(text)
    if m:
        text = text[m.end() :]
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [re.sub(r"^#{1,6}\s+", "", ln) for ln in lines]
    # Drop chatter paragraphs at either end ("Sure! Here is ...:", "Let me know ...").
    # Only ever drop a line when real content remains after it.
    while lines and (not lines[0] or (_is_leading_chatter(lines[0]) and any(lines[1:]))):
        lines.pop(0)
    while lines and (not lines[-1] or (_CHATTER_END.match(lines[-1]) and any(lines[:-1]))):
        lines.pop()
    # A description label on a later line ("Sure!\nDescription: ...").
    joined = "\n".join(lines)
    m = _DESC_LABEL.search(joined)
    if m:
        joined = joined[m.end() :]
    desc = " ".join(part.strip() for part in joined.split("\n") if part.strip())
    desc = re.sub(r"\s+", " ", desc).strip()
    desc = re.sub(r"^(?:\d+[.)]\s*)", "", desc)
    return desc.strip(" \"'“”「」").strip()


def _is_leading_chatter(line: str) -> bool:
    if _DESC_LABEL.match(line):
        return False
    if line.endswith((":", "：")):
        return len(line.split()) <= 15
    return bool(_CHATTER_START.match(line)) and len(line.split()) <= 4
