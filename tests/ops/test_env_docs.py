"""Every environment variable the code reads is documented with its default.

Settings: every field of every service's settings class, nested ones included, under the
name pydantic-settings reads (env prefix + field, `__` between nested levels, as each
class configures), must have a row in docs/configuration.md or a doc it points to
(embedder.md, captioner.md) whose default cell shows the field's real default. Plain
reads (os.environ / os.getenv / typer's envvar=) are found by grepping the code; each
must be in a table row too, with the default the code falls back to.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings

from services.captioner.settings import CaptionerSettings
from services.common.settings import MiB
from services.embedder.settings import EmbedderSettings
from services.gateway.settings import GatewaySettings
from services.search.settings import SearchSettings

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
SETTINGS_DOCS = ("configuration.md", "embedder.md", "captioner.md")
SETTINGS: tuple[type[BaseSettings], ...] = (SearchSettings, EmbedderSettings, CaptionerSettings, GatewaySettings)
PREFIXES = ("SEARCH_", "EMBEDDER_", "CAPTIONER_", "GATEWAY_")
# What the code falls back to when each plainly-read variable is unset (the test fails
# when the code reads one that is not listed here, so a new read needs its default).
PLAIN_DEFAULTS = {
    "DASHSCOPE_API_KEY": "unset",
    "MMSEARCH_CACHE_DIR": "~/.cache/mmsearch",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "OMP_NUM_THREADS": "half the cores",
    "COLUMNS": "120",
    "MMSEARCH_ADDRESS": "127.0.0.1:50050",
    "MMSEARCH_TOKEN": "none",
    "MMSEARCH_TLS": "off",
    "MMSEARCH_CA_FILE": "TLS",
    "MMSEARCH_CERT_FILE": "mTLS",
    "MMSEARCH_KEY_FILE": "mTLS",
    "MMSEARCH_SERVER_NAME": "certificate",
    "MMSEARCH_TIMEOUT": "30",
    "MMSEARCH_MILVUS_URI": "unset",
    "MMSEARCH_EMBEDDER_ADDRESS": "127.0.0.1:50051",
    "MMSEARCH_CAPTIONER_ADDRESS": "127.0.0.1:50052",
}
_READS = (
    re.compile(r"""os\.environ\.get\(\s*["']([A-Z0-9_]+)["']"""),
    re.compile(r"""os\.getenv\(\s*["']([A-Z0-9_]+)["']"""),
    re.compile(r"""os\.environ\[\s*["']([A-Z0-9_]+)["']\s*\]"""),
    re.compile(r"""["']([A-Z0-9_]+)["']\s+in\s+os\.environ"""),
    re.compile(r"""envvar\s*=\s*["']([A-Z0-9_]+)["']"""),
)
_UNSET_WORDS = ("unset", "empty", "none", "default", "derived", "off", "all ")


# --- what the code reads --------------------------------------------------------------------

def env_fields(model: type[BaseModel], prefix: str, delimiter: str) -> dict[str, Any]:
    """Variable name -> default, recursing into nested models."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        var = prefix + name.upper()
        if isinstance(default, BaseModel):
            out.update(env_fields(type(default), var + delimiter, delimiter))
        else:
            out[var] = default
    return out


def settings_variables() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in SETTINGS:
        config = cls.model_config
        assert config.get("case_sensitive") in (None, False)
        out.update(env_fields(cls, config["env_prefix"], config["env_nested_delimiter"]))
    return out


def plain_reads() -> set[str]:
    found = set()
    for path in [*REPO.glob("services/**/*.py"), *REPO.glob("mmsearch/**/*.py")]:
        if "_pb2" in path.name:
            continue
        text = path.read_text()
        for pattern in _READS:
            found.update(pattern.findall(text))
    return found


# --- what the docs say ------------------------------------------------------------------------

def doc_rows(names: tuple[str, ...]) -> dict[str, list[str]]:
    """Variable -> the default cells of the table rows naming it.

    A row's first cell names variables (`NAME`, several in a row, `__SUFFIX` continuing the
    previous name's parent); under a heading with (`SEARCH_...`) etc. the names are relative
    to that prefix, under (`<PREFIX>_...`) to each service's. Defaults in the second cell,
    one per name when the counts match ("16, 200, 128")."""
    rows: dict[str, list[str]] = {}
    for doc in names:
        prefixes: tuple[str, ...] = ()
        for line in (DOCS / doc).read_text().splitlines():
            if line.startswith("#"):
                found = [p for p in PREFIXES if f"`{p}" in line]
                prefixes = PREFIXES if "<PREFIX>" in line else tuple(found[:1])
                continue
            if not line.startswith("|") or re.fullmatch(r"[|\s:-]+", line):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 2:
                continue
            tokens = re.findall(r"`([A-Z][A-Z0-9_]*|__[A-Z0-9_]+)`", cells[0])
            names_in_row: list[str] = []
            for tok in tokens:
                if tok.startswith("__") and names_in_row:
                    tok = names_in_row[-1].rsplit("__", 1)[0] + tok
                names_in_row.append(tok)
            defaults = [d.strip() for d in cells[1].replace("`", "").split(", ")]
            for i, name in enumerate(names_in_row):
                cell = defaults[i] if len(defaults) == len(names_in_row) else cells[1].replace("`", "")
                fulls = [name] if not prefixes else [name if name.startswith(p) else p + name for p in prefixes]
                for full in fulls:
                    rows.setdefault(full, []).append(cell)
            # tables that name a variable in a later column (cli.md: option | variable | default)
            for j, cell in enumerate(cells[1:], start=1):
                for tok in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell):
                    rows.setdefault(tok, []).append(" ".join(cells[j + 1:]).replace("`", ""))
    return rows


def renderings(value: Any) -> list[str]:
    if value is None or value == "" or value == [] or value == () or value == {}:
        return list(_UNSET_WORDS)
    if isinstance(value, dict):  # set as JSON in the environment
        return [json.dumps(value)]
    if isinstance(value, SecretStr):
        return list(_UNSET_WORDS)
    if isinstance(value, bool):
        return [str(value).lower(), "on" if value else "off"]
    if isinstance(value, int):
        out = [str(value), f"{value:,}"]
        if value % MiB == 0:
            out.append(f"{value // MiB} MiB")
        return out
    if isinstance(value, float):
        return [str(int(value)), str(value)] if value.is_integer() else [repr(value)]
    if isinstance(value, list | tuple):
        return [",".join(map(str, value))]
    return [str(value)]


def shows(cell: str, value: Any) -> bool:
    text = cell.lower()
    for r in renderings(value):
        r = r.lower()
        if r.strip() in _UNSET_WORDS or r in _UNSET_WORDS:
            if r.strip() in text:
                return True
        elif re.search(r"(?<![\w.])" + re.escape(r) + r"(?![\w])", text):
            return True
    return False


def test_settings_are_enumerated() -> None:
    variables = settings_variables()
    assert "SEARCH_TLS__CERT_FILE" in variables and "SEARCH_MILVUS_TLS__CA_FILE" in variables
    assert "EMBEDDER_DASHSCOPE__RETRY__MAX_ATTEMPTS" in variables and "CAPTIONER_RETRY__BUDGET_S" in variables
    assert variables["SEARCH_MAX_RECEIVE_MESSAGE_BYTES"] == 64 * MiB and len(variables) > 150


def test_every_setting_is_documented_with_its_default() -> None:
    rows = doc_rows(SETTINGS_DOCS)
    missing = [name for name in settings_variables() if name not in rows]
    wrong = [f"{name}: code default {value!r}, documented {rows[name]}"
             for name, value in settings_variables().items() if name in rows and not any(shows(c, value) for c in rows[name])]
    assert not missing, "not in docs/configuration.md (or embedder.md / captioner.md):\n" + "\n".join(missing)
    assert not wrong, "\n".join(wrong)


def test_every_plain_environment_read_is_documented_with_its_default() -> None:
    reads = plain_reads()
    assert {"MMSEARCH_CACHE_DIR", "DASHSCOPE_API_KEY"} <= reads
    unlisted = reads - set(PLAIN_DEFAULTS) - set(settings_variables())
    assert not unlisted, f"new environment reads: add them (with their default) to PLAIN_DEFAULTS and the docs: {unlisted}"
    rows = doc_rows((*SETTINGS_DOCS, "cli.md"))
    problems = []
    for name in sorted(reads & set(PLAIN_DEFAULTS)):
        cells = rows.get(name)
        if not cells:
            problems.append(f"{name}: in no table of docs/configuration.md or docs/cli.md")
        elif not any(PLAIN_DEFAULTS[name].lower() in c.lower() for c in cells):
            problems.append(f"{name}: default {PLAIN_DEFAULTS[name]!r} not stated ({cells})")
    assert not problems, "\n".join(problems)


def test_the_check_is_not_vacuous() -> None:
    assert shows("64 MiB", 64 * MiB) and shows("10, 8", 10.0) and not shows("5", 0.0)
    assert shows("unset", None) and shows("`0.0.0.0`", "0.0.0.0") and not shows("2048", 20)
    assert shows("off", False) and not shows("true", False)
