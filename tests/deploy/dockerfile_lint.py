"""A small Dockerfile checker for the hadolint rules we rely on, so the lint runs even where
the hadolint binary is not installed (test_deploy_dockerfile.py also runs hadolint itself
when it is on PATH or in the virtualenv).

Rules (hadolint ids where one exists):
  DL3006  FROM images carry an explicit tag or digest
  DL3007  never the `latest` tag
  DL3002  the last USER of every final stage is not root
  DL3008  apt-get install pins versions (pkg=version) and uses --no-install-recommends
  DL3013  pip install pins versions (==) or installs a local path / requirements file
  DL3042  pip install uses --no-cache-dir
  DL3020  COPY, not ADD
  DL3025  CMD / ENTRYPOINT in JSON (exec) form
  DL4006  RUN with a pipe runs under `set -o pipefail` (SHELL or inline)
  MM001   no ENV / ARG whose name looks like a secret (…KEY, …TOKEN, …PASSWORD, …SECRET)
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.rule} {self.message}"


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL)", re.IGNORECASE)


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    return out


def _stages(instrs: list[Instruction]) -> list[tuple[str | None, list[Instruction]]]:
    stages: list[tuple[str | None, list[Instruction]]] = []
    for ins in instrs:
        if ins.keyword == "FROM":
            m = re.search(r"\bAS\s+(\S+)\s*$", ins.args, re.IGNORECASE)
            stages.append((m.group(1).lower() if m else None, [ins]))
        elif stages:
            stages[-1][1].append(ins)
    return stages


def _image_of(from_args: str) -> str:
    parts = [p for p in from_args.split() if not p.startswith("--")]
    return parts[0]


def lint(text: str, final_stages: tuple[str, ...] | None = None) -> list[Finding]:
    """Findings for the Dockerfile `text`. `final_stages`: the targets that ship (default:
    every stage no other stage copies from or builds on, plus the last one)."""
    instrs = parse(text)
    findings: list[Finding] = []
    stages = _stages(instrs)
    names = {name for name, _ in stages if name}
    used_as_base_or_source: set[str] = set()
    pipefail_shell = False

    for name, body in stages:
        for ins in body:
            kw, args = ins.keyword, ins.args
            if kw == "FROM":
                image = _image_of(args)
                if image.lower() in names:
                    used_as_base_or_source.add(image.lower())
                elif image != "scratch":
                    if "$" in image:
                        findings.append(Finding(ins.line, "DL3006", f"image {image} is a variable; pin it literally"))
                    elif "@sha256:" not in image and ":" not in image.rsplit("/", 1)[-1]:
                        findings.append(Finding(ins.line, "DL3006", f"image {image} has no tag"))
                    elif image.endswith(":latest"):
                        findings.append(Finding(ins.line, "DL3007", f"image {image} uses latest"))
                pipefail_shell = False  # SHELL does not carry across stages
            elif kw in ("COPY",):
                m = re.search(r"--from=(\S+)", args)
                if m:
                    used_as_base_or_source.add(m.group(1).lower())
            elif kw == "ADD":
                findings.append(Finding(ins.line, "DL3020", "use COPY instead of ADD"))
            elif kw in ("CMD", "ENTRYPOINT"):
                try:
                    ok = isinstance(json.loads(args), list)
                except json.JSONDecodeError:
                    ok = False
                if not ok:
                    findings.append(Finding(ins.line, "DL3025", f"{kw} must use the JSON form"))
            elif kw == "SHELL":
                pipefail_shell = "pipefail" in args
            elif kw in ("ENV", "ARG"):
                for key in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args):
                    if SECRET_NAME.search(key):
                        findings.append(Finding(ins.line, "MM001", f"{kw} {key} looks like a secret"))
            elif kw == "RUN":
                findings.extend(_lint_run(ins, pipefail_shell))

    shipped = set(final_stages) if final_stages else (
        {n for n, _ in stages if n and n not in used_as_base_or_source} | {stages[-1][0]}
    )
    for name, body in stages:
        if name not in shipped:
            continue
        users = [i for i in body if i.keyword == "USER"]
        if not users:
            findings.append(Finding(body[0].line, "DL3002", f"stage {name} never switches away from root"))
        elif users[-1].args.split(":")[0] in ("root", "0"):
            findings.append(Finding(users[-1].line, "DL3002", f"stage {name} ends as root"))
    return findings


def _lint_run(ins: Instruction, pipefail_shell: bool) -> list[Finding]:
    findings: list[Finding] = []
    script = re.sub(r"--mount=\S+", "", ins.args)
    if re.search(r"[^|]\|[^|]", script) and not pipefail_shell and "pipefail" not in script:
        findings.append(Finding(ins.line, "DL4006", "pipe without set -o pipefail"))
    for command in re.split(r"&&|;|\|\|", script):
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        if not words:
            continue
        if "apt-get" in words and "install" in words:
            pkgs = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
            if "--no-install-recommends" not in words:
                findings.append(Finding(ins.line, "DL3015", "apt-get install without --no-install-recommends"))
            for p in pkgs:
                if "=" not in p:
                    findings.append(Finding(ins.line, "DL3008", f"apt package {p} is not pinned"))
        is_pip = any(w in ("pip", "pip3") or w.endswith("/pip") for w in words[:3]) or words[:3] == ["python", "-m", "pip"]
        if is_pip and "install" in words:
            rest = words[words.index("install") + 1:]
            if "--no-cache-dir" not in rest:
                findings.append(Finding(ins.line, "DL3042", "pip install without --no-cache-dir"))
            skip_next = False
            for w in rest:
                if skip_next:
                    skip_next = False
                    continue
                if w in ("-r", "--requirement", "-c", "--constraint", "--index-url", "-i", "--extra-index-url",
                         "--find-links", "-f", "--target", "-t"):
                    skip_next = True
                    continue
                if w.startswith("-"):
                    continue
                path = w.strip("'\"").split("[", 1)[0]  # a local project with extras: ".[bge]"
                local = path in (".", "..") or path.startswith(("./", "/", "../")) or path.endswith((".whl", ".tar.gz"))
                if not local and "==" not in w and "@" not in w:
                    findings.append(Finding(ins.line, "DL3013", f"pip package {w} is not pinned"))
    return findings
