"""The caption parser on realistic Qwen-VL / VLM outputs (the tutorial's among them)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.captioner.parsing import clean_keywords, limit_words, parse_caption

# (raw model output, expected description, expected keywords)
CASES: list[tuple[str, str, list[str]]] = [
    # 1. The tutorial's example, keywords inline on the same line as the description.
    (
        (
            "A person in jeans and green boots stands on a beach. The sand is covered with water marks. "
            "Keywords: beach, footprints, sand, shoes, pants"
        ),
        "A person in jeans and green boots stands on a beach. The sand is covered with water marks.",
        ["beach", "footprints", "sand", "shoes", "pants"],
    ),
    # 2. Tutorial output, single newline.
    (
        (
            "A photo of a small dog standing on a carpet. It has brown fur and blue eyes.\n"
            "Keywords: puppy, carpet, eyes, fur color, standing"
        ),
        "A photo of a small dog standing on a carpet. It has brown fur and blue eyes.",
        ["puppy", "carpet", "eyes", "fur color", "standing"],
    ),
    # 3. Tutorial output, blank line.
    (
        (
            "This is a brown hound with drooping ears and a collar around its neck. It is looking straight ahead."
            "\n\nKeywords: dog, brown, hound, ears, collar"
        ),
        "This is a brown hound with drooping ears and a collar around its neck. It is looking straight ahead.",
        ["dog", "brown", "hound", "ears", "collar"],
    ),
    # 4. Tutorial output with multi-word keywords.
    (
        (
            "A lion rests among dense green plants. The background consists of bamboo and trees.\n\n"
            "Keywords: lion, grass, green plants, tree trunk, natural environment"
        ),
        "A lion rests among dense green plants. The background consists of bamboo and trees.",
        ["lion", "grass", "green plants", "tree trunk", "natural environment"],
    ),
    # 5. Chinese, full-width colon and comma.
    (
        "一只橘猫慵懒地躺在窗台上晒太阳，窗外是绿色的树木。\n关键词：橘猫，窗台，阳光，慵懒，宠物",
        "一只橘猫慵懒地躺在窗台上晒太阳,窗外是绿色的树木。",
        ["橘猫", "窗台", "阳光", "慵懒", "宠物"],
    ),
    # 6. Chinese with the enumeration comma 、 and a description label.
    (
        "描述：两只小狗在草地上玩耍，背景是蓝天白云。\n\n关键词：小狗、草地、玩耍、蓝天、白云",
        "两只小狗在草地上玩耍,背景是蓝天白云。",
        ["小狗", "草地", "玩耍", "蓝天", "白云"],
    ),
    # 7. Numbered keyword list under a label line.
    (
        (
            "Description: A red sports car is parked on a wet city street at night.\n\n"
            "Keywords:\n1. sports car\n2. red\n3. street\n4. night\n5. city"
        ),
        "A red sports car is parked on a wet city street at night.",
        ["sports car", "red", "street", "night", "city"],
    ),
    # 8. Bulleted list under a markdown heading, with chatter before and after.
    (
        (
            "Sure! Here is a description of the image:\n\n"
            "A bowl of ramen topped with a soft-boiled egg, scallions and sliced pork.\n\n"
            "### Keywords\n- Ramen\n- Egg\n- Scallions\n- Pork\n- Noodles\n\n"
            "Let me know if you need anything else!"
        ),
        "A bowl of ramen topped with a soft-boiled egg, scallions and sliced pork.",
        ["ramen", "egg", "scallions", "pork", "noodles"],
    ),
    # 9. Markdown bold labels.
    (
        (
            "**Description:** A tabby cat sleeps curled up on a grey sofa next to a cushion.\n\n"
            "**Keywords:** cat, sofa, sleeping, cushion, indoor"
        ),
        "A tabby cat sleeps curled up on a grey sofa next to a cushion.",
        ["cat", "sofa", "sleeping", "cushion", "indoor"],
    ),
    # 10. Bold label with the colon outside the bold; trailing period; capitalised keywords.
    (
        (
            "An espresso in a white cup on a saucer, with a small spoon.\n\n"
            "**Keywords**: Coffee, Espresso, Cup, Saucer, Spoon."
        ),
        "An espresso in a white cup on a saucer, with a small spoon.",
        ["coffee", "espresso", "cup", "saucer", "spoon"],
    ),
    # 11. No keywords at all.
    (
        "A rocket stands on a launch pad under a clear blue sky, surrounded by service towers.",
        "A rocket stands on a launch pad under a clear blue sky, surrounded by service towers.",
        [],
    ),
    # 12. Hashtags instead of a keyword line.
    (
        "The sun sets over a calm sea, painting the sky orange and pink.\n#sunset #ocean #sky #evening #seascape",
        "The sun sets over a calm sea, painting the sky orange and pink.",
        ["sunset", "ocean", "sky", "evening", "seascape"],
    ),
    # 13. "5 keywords:" with quoted, semicolon separated keywords.
    (
        (
            'An astronaut in an orange suit poses in front of the US flag.\n\n5 keywords: "astronaut"; "flag"; '
            '"space suit"; "portrait"; "NASA"'
        ),
        "An astronaut in an orange suit poses in front of the US flag.",
        ["astronaut", "flag", "space suit", "portrait", "nasa"],
    ),
    # 14. Numbered sections with the keywords numbered inline.
    (
        (
            "1. Description: A pagoda rises above green trees on a hillside.\n"
            "2. Keywords: 1. pagoda 2. temple 3. trees 4. hill 5. architecture"
        ),
        "A pagoda rises above green trees on a hillside.",
        ["pagoda", "temple", "trees", "hill", "architecture"],
    ),
    # 15. Keywords with explanations and duplicates, "and" before the last one.
    (
        (
            "A motorcycle parked in a garage next to tools.\n\nKeywords:\n"
            "- **Motorcycle**: the main subject\n- Garage - the setting\n- motorcycle\n- tools"
        ),
        "A motorcycle parked in a garage next to tools.",
        ["motorcycle", "garage", "tools"],
    ),
    # 16. "and" before the last keyword, keywords separated by commas on their own line.
    (
        "A man holds a camera on a tripod in a park.\nKeywords:\ncamera, tripod, man, park, and photography",
        "A man holds a camera on a tripod in a park.",
        ["camera", "tripod", "man", "park", "photography"],
    ),
    # 17. Keywords first, description after, Chinese-style label with English content.
    (
        "Keywords: flower, pink, petals, macro, garden\n\nA close-up of a pink flower with soft petals.",
        "A close-up of a pink flower with soft petals.",
        ["flower", "pink", "petals", "macro", "garden"],
    ),
    # 18. Chatter before, "Tags:" label, a closing remark.
    (
        (
            "Certainly.\nA stack of old coins lies on a dark table.\nTags: coins, money, antique, metal, history\n"
            "I hope this helps!"
        ),
        "A stack of old coins lies on a dark table.",
        ["coins", "money", "antique", "metal", "history"],
    ),
    # 19. Chinese label with a count, keywords split by Chinese semicolons, no punctuation before label.
    (
        "夜晚的城市街道灯火通明5个关键词：城市；夜景；街道；灯光；建筑",
        "夜晚的城市街道灯火通明",
        ["城市", "夜景", "街道", "灯光", "建筑"],
    ),
    # 20. Empty answer.
    ("", "", []),
]


@pytest.mark.parametrize(("raw", "description", "keywords"), CASES, ids=[f"case{i + 1}" for i in range(len(CASES))])
def test_realistic_outputs(raw: str, description: str, keywords: list[str]) -> None:
    parsed = parse_caption(raw)
    assert parsed.raw_text == raw
    assert parsed.description == description
    assert parsed.keywords == keywords


def test_max_keywords_caps_the_list() -> None:
    parsed = parse_caption("A dog.\nKeywords: a1, b2, c3, d4, e5, f6", max_keywords=3)
    assert parsed.keywords == ["a1", "b2", "c3"]


def test_sentences_are_not_keywords() -> None:
    assert clean_keywords(["this is a long sentence that is certainly not a keyword at all", "ok"]) == ["ok"]


def test_limit_words() -> None:
    text = "One two three. Four five six seven. Eight nine ten eleven twelve."
    assert limit_words(text, 100) == text
    assert limit_words(text, 8) == "One two three. Four five six seven."
    assert limit_words("a b c d e f", 3) == "a b c…"
    assert limit_words("中文没有空格所以不截断", 2) == "中文没有空格所以不截断"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_never_crashes_and_keywords_are_clean(raw: str) -> None:
    parsed = parse_caption(raw)
    assert parsed.raw_text == raw
    assert isinstance(parsed.description, str)
    assert all(k and k == k.strip() for k in parsed.keywords)
    assert len({k.casefold() for k in parsed.keywords}) == len(parsed.keywords)
    assert len(parsed.keywords) <= 10


_word = st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Lo", "Nd")), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_word, min_size=1, max_size=8),
    st.sampled_from([", ", "，", "、", "; "]),
    st.sampled_from(["Keywords: ", "关键词：", "**Keywords:** "]),
)
def test_labelled_keywords_round_trip(words: list[str], sep: str, label: str) -> None:
    raw = "A picture of something.\n" + label + sep.join(words)
    parsed = parse_caption(raw)
    expected = clean_keywords(words)
    assert parsed.keywords == expected
