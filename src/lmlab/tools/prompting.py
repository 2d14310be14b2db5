"""Tool-documentation prompting: demonstrations, documentation, or both, within a token budget.

Hsieh et al. 2023, "Tool Documentation Enables Zero-Shot Tool-Usage with Large Language Models"
(arXiv 2308.00675; no official code). The paper compares prompting with demonstrations only (few-shot
request -> call examples), with the tools' documentation only (zero-shot), and with both, and finds
that documentation alone matches or beats demonstrations, most of all when there are many tools
(its Sec. 4, LLM-Cloud CLI results: docs retrieved by a retriever over the whole gcloud reference).

:func:`build_prompt` makes the chat messages for one request. The four modes are the paper's grid of
zero-shot / few-shot without / with documentation:

- ``none``: the system message and the request alone (zero-shot, no documentation: the baseline);
- ``demos``: ``n_demos`` request -> command pairs from the train split (other command groups than any
  test request), most similar request first (BM25 over train requests), as user/assistant turns;
- ``docs``: the documentation of the top-``n_docs`` retrieved commands (the retriever's ranking);
- ``both``: demonstrations, then documentation (few-shot with documentation).

``demos`` and ``both`` are few-shot; ``none`` and ``docs`` are zero-shot (:data:`SHOTS`).

Budget rule (the "stated rule" the issue asks for): the system message and the request always go in;
then demonstrations are added whole, best first, while they fit (in ``both`` mode within
``demo_share`` of the budget); then documentation fills what is left in priority rounds over the
candidates in rank order - round 1 every candidate's usage line, round 2 its summary, round 3 its
required parameters, then its optional parameters one per candidate per round in documented order
(each with the first sentence of its description and its enum values). A line is added only if the
whole prompt still fits; a candidate whose next line does not fit gets no more lines. So a prompt
never exceeds ``budget`` tokens as counted by the ``count_tokens`` callable (the model's own chat
template and tokenizer in :func:`evaluate_prompting`), and the best-ranked tools are the most complete.

Chat models get the messages through their chat template. A base model (a local tokenizer without a chat
template, e.g. Gemma-3-270M base) gets the same content as a completion prompt (:func:`completion_prompt`):
the system line, each turn as "Request: ...\nCommand: ...", and the last "Command:" prefilled with
"gcloud", cut at the first newline - otherwise a base model continues the "user:/assistant:" transcript
instead of answering. The budget is counted on the text the model actually sees either way.

The reply is parsed with :func:`lmlab.tools.cloud_cli.extract_command` and scored with
:func:`~lmlab.tools.cloud_cli.compare` and :func:`~lmlab.tools.cloud_cli.validate`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from lmlab.errors import ConfigError, DataError
from lmlab.tools.catalog import Catalog, Tool
from lmlab.tools.cloud_cli import (
    CliExample,
    Comparison,
    Scores,
    aggregate,
    compare,
    extract_command,
    validate,
)

MODES = ("none", "demos", "docs", "both")
FORMATS = ("auto", "chat", "completion")
ASK = "\nReply with the gcloud command only."
PREFILL = "gcloud"
SHOTS = {"none": "zero-shot", "demos": "few-shot", "docs": "zero-shot", "both": "few-shot"}
SYSTEM = ("You translate requests into gcloud commands. Answer with exactly one gcloud command on one line "
          "and nothing else.")

Message = dict[str, str]


@dataclass(frozen=True)
class PromptConfig:
    mode: str = "docs"  # "none" | "demos" | "docs" | "both" (see the module docstring)
    n_demos: int = 3  # demonstrations in demos/both mode (paper: few-shot)
    n_docs: int = 3  # candidate commands whose documentation is shown (docs/both mode)
    budget: int = 768  # prompt tokens (SmolLM2's window is 8192; 768 keeps the default CPU recipe inside 30 min)
    demo_share: float = 0.35  # in "both" mode, demonstrations may use at most this share of the budget
    oracle: bool = False  # analysis only: the gold command is always a candidate (first), the rest retrieved
    max_metavar: int = 40  # characters of a flag's value placeholder shown
    max_flag_chars: int = 160  # characters of a flag's description shown
    format: str = "auto"  # "chat" | "completion" | "auto" (completion for local tokenizers without a chat template)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown prompting mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown prompt format {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.budget < 32:
            raise ConfigError(f"a budget of {self.budget} tokens cannot hold a request")


def _first_sentence(text: str, limit: int) -> str:
    text = " ".join(text.split())
    m = re.search(r"(?<=[a-z0-9)\]'\"])\.\s", text)
    s = text[:m.end() - 1] if m else text
    return s if len(s) <= limit else s[:limit - 3].rstrip() + "..."


def usage_line(tool: Tool, *, max_metavar: int = 40) -> str:
    """A compact synopsis: path, positionals, required flags and required groups, then ``[flags]``."""
    parts = [tool.name]
    for p in tool.parameters:
        if p.kind == "positional":
            parts.append(p.name + (" ..." if p.repeated else "") if p.required else f"[{p.name}]")
    for p in tool.parameters:
        if p.kind == "flag" and p.required:
            parts.append(p.name + (f"={p.metavar[:max_metavar]}" if p.metavar else ""))
    for group in tool.one_of_required:
        parts.append("(" + " | ".join(group[:4]) + (" | ..." if len(group) > 4 else "") + ")")
    if any(p.kind == "flag" and not p.required for p in tool.parameters):
        parts.append("[flags]")
    return "Usage: " + " ".join(parts)


def doc_lines(tool: Tool, config: PromptConfig = PromptConfig()) -> list[list[str]]:
    """A tool's documentation lines by priority round: [usage], [summary], [required...], optional flags..."""
    rounds: list[list[str]] = [[f"## {tool.name}", usage_line(tool, max_metavar=config.max_metavar)]]
    rounds.append([_first_sentence(tool.summary or tool.description, 200)] if (tool.summary or tool.description)
                  else [])

    def line(p) -> str:
        head = p.name + (f"={p.metavar[:config.max_metavar]}" if p.metavar and p.kind == "flag" else "")
        desc = _first_sentence(p.description, config.max_flag_chars)
        if p.enum:
            desc += " One of: " + ", ".join(p.enum[:8]) + "."
        return f"  {head}: {desc}".rstrip(": ")

    rounds.append([line(p) for p in tool.parameters if p.required])
    rounds += [[line(p)] for p in tool.parameters if not p.required and p.kind == "flag"]
    return rounds


@dataclass(frozen=True)
class Prompt:
    messages: list[Message]
    n_tokens: int
    demos: list[str]  # tools of the demonstrations included
    docs: dict[str, int]  # candidate tool -> documentation lines included


def build_prompt(request: str, *, config: PromptConfig, count_tokens: Callable[[list[Message]], int],
                 demos: list[CliExample] = (), candidates: list[Tool] = ()) -> Prompt:
    """Chat messages for one request within ``config.budget`` tokens (rule in the module docstring)."""
    use_demos = config.mode in ("demos", "both")
    use_docs = config.mode in ("docs", "both")

    def assemble(demo_list: list[CliExample], doc_text: str) -> list[Message]:
        msgs: list[Message] = [{"role": "system", "content": SYSTEM}]
        for d in demo_list:
            msgs += [{"role": "user", "content": f"Request: {d.request}{ASK}"},
                     {"role": "assistant", "content": d.command}]
        body = (f"Documentation of candidate commands:\n\n{doc_text}\n\n" if doc_text else "") + \
            f"Request: {request}{ASK}"
        msgs.append({"role": "user", "content": body})
        return msgs

    base = count_tokens(assemble([], ""))
    if base > config.budget:
        raise DataError(f"the request alone takes {base} tokens, over the budget of {config.budget}")
    chosen: list[CliExample] = []
    if use_demos:
        demo_cap = config.budget if not use_docs else base + int(config.demo_share * (config.budget - base))
        for d in list(demos)[:config.n_demos]:
            if count_tokens(assemble([*chosen, d], "")) <= demo_cap:
                chosen.append(d)
    doc_counts: dict[str, int] = {}
    doc_text = ""
    if use_docs and candidates:
        cands = list(candidates)[:config.n_docs]
        per_tool = [doc_lines(t, config) for t in cands]
        kept: list[list[str]] = [[] for _ in cands]
        open_ = [True] * len(cands)

        def render(k: list[list[str]]) -> str:
            return "\n\n".join("\n".join(x) for x in k if x)

        for r in range(max(len(x) for x in per_tool)):
            for i, rounds in enumerate(per_tool):
                if not open_[i] or r >= len(rounds) or not rounds[r]:
                    continue
                trial = [list(x) for x in kept]
                trial[i] += rounds[r]
                if count_tokens(assemble(chosen, render(trial))) <= config.budget:
                    kept = trial
                else:
                    open_[i] = False
            if not any(open_):
                break
        doc_text = render(kept)
        doc_counts = {t.name: len(x) for t, x in zip(cands, kept, strict=True) if x}
    messages = assemble(chosen, doc_text)
    return Prompt(messages, count_tokens(messages), [d.tool for d in chosen], doc_counts)


def chat_token_counter(tokenizer) -> Callable[[list[Message]], int]:
    """Tokens of the chat-formatted prompt as the model will see it (lmlab.lm.backends.chat_prompt)."""
    from lmlab.lm.backends import chat_prompt

    def count(messages: list[Message]) -> int:
        return len(tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])

    return count


def completion_prompt(messages: list[Message]) -> str:
    """The messages as one completion prompt for a base model, ending in the prefilled "Command: gcloud".

    System text, then every user turn with its request's "Reply with..." line replaced by "Command:" and
    every assistant turn (a demonstration's command) after it; the model continues the last command.
    """
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            body = m["content"][:-len(ASK)] if m["content"].endswith(ASK) else m["content"]
            out.append(body + "\nCommand:")
        else:
            out.append(" " + m["content"] + "\n\n")
    return "".join(out) + " " + PREFILL


def completion_token_counter(tokenizer) -> Callable[[list[Message]], int]:
    """Tokens of :func:`completion_prompt` (what a base model sees)."""

    def count(messages: list[Message]) -> int:
        return len(tokenizer(completion_prompt(messages), add_special_tokens=False)["input_ids"])

    return count


def prompt_format(backend, config: PromptConfig) -> str:
    """"chat" or "completion": ``config.format``, or for "auto" completion when the backend's local tokenizer
    has no chat template (a base model); HTTP backends are chat."""
    if config.format != "auto":
        return config.format
    tok = getattr(backend, "tokenizer", None)
    return "completion" if tok is not None and not getattr(tok, "chat_template", None) else "chat"


def ask(backend, messages: list[Message], fmt: str, *, max_tokens: int) -> str:
    """The backend's reply text: chat, or a greedy completion of :func:`completion_prompt` (prefill kept)."""
    if fmt == "chat":
        return backend.chat(messages, max_tokens=max_tokens, temperature=0.0).text
    text = backend.generate([completion_prompt(messages)], max_tokens=max_tokens, temperature=0.0,
                            stop=["\n"])[0][0].text
    return PREFILL + text


def approx_token_counter(messages: list[Message]) -> int:
    """For backends without a local tokenizer (HTTP): 1 token per 3 characters plus 8 per message (conservative
    for English BPE vocabularies, which average ~4 characters per token)."""
    return sum(len(m["content"]) // 3 + 8 for m in messages)


class DemoPool:
    """Demonstrations: train pairs ranked by BM25 similarity of their request to the query request."""

    def __init__(self, examples: list[CliExample]):
        import bm25s

        if not examples:
            raise DataError("no demonstrations to choose from (empty train split)")
        self.examples = examples
        self._bm25s = bm25s
        self.model = bm25s.BM25()
        self.model.index(bm25s.tokenize([e.request for e in examples], stopwords="en", show_progress=False),
                         show_progress=False)

    def select(self, request: str, k: int) -> list[CliExample]:
        if k <= 0:
            return []
        tokens = self._bm25s.tokenize([request], stopwords="en", show_progress=False)
        if not len(tokens.ids[0]):
            return self.examples[:k]
        I, _ = self.model.retrieve(tokens, k=min(k, len(self.examples)), show_progress=False, n_threads=1)  # noqa: E741
        return [self.examples[i] for i in I[0]]


@dataclass(frozen=True)
class PromptingResult:
    config: PromptConfig
    scores: Scores
    retrieval_recall: float | None  # fraction of requests whose gold command is among the shown candidates
    records: list[dict]
    seconds: float


def score_prediction(gold: str, request: str, pred: str | None, catalog: Catalog) -> tuple[Comparison, dict]:
    """One predicted command against the gold one: the comparison, and the fields a record keeps of it."""
    comp = compare(gold, pred, catalog=catalog, request=request)
    v = validate(pred, catalog) if pred else None
    return comp, {"path_correct": comp.path_correct, "flag_f1": comp.flag_f1, "exact": comp.exact,
                  "valid": bool(v and v.ok), "feedback": list(v.errors) if v else ["no gcloud command in the reply"]}


def rescore(records: list[dict], catalog: Catalog) -> tuple[Scores, list[dict]]:
    """Scores and updated records for stored predictions (each record's gold, request and pred), with the
    current comparator and validator: a fix to the scorer needs no model rerun."""
    comps, valid, out = [], [], []
    for r in records:
        comp, scored = score_prediction(r["gold"], r["request"], r["pred"], catalog)
        comps.append(comp)
        valid.append(scored["valid"])
        out.append({**r, **scored})
    return aggregate(comps, valid), out


def evaluate_prompting(backend, examples: list[CliExample], catalog: Catalog, *, config: PromptConfig,
                       retriever=None, demo_pool: DemoPool | None = None, count_tokens=None,
                       max_tokens: int = 64, progress: bool = False) -> PromptingResult:
    """Prompt ``backend`` (lmlab.lm.backends protocol, chat) for each example and score the commands."""
    if config.mode in ("docs", "both") and retriever is None:
        raise ConfigError(f"mode {config.mode!r} needs a retriever for the candidate documentation")
    if config.mode in ("demos", "both") and demo_pool is None and config.n_demos > 0:
        raise ConfigError(f"mode {config.mode!r} needs a pool of demonstrations")
    fmt = prompt_format(backend, config)
    if count_tokens is None:
        tok = getattr(backend, "tokenizer", None)
        count_tokens = approx_token_counter if tok is None else \
            completion_token_counter(tok) if fmt == "completion" else chat_token_counter(tok)
    window = getattr(backend, "max_length", None)
    if window is not None and config.budget + max_tokens > window:  # the model's window caps the budget
        config = replace(config, budget=window - max_tokens)
    t0 = time.perf_counter()
    records, comps, valid, hits = [], [], [], []
    it = examples
    if progress:
        from tqdm import tqdm

        it = tqdm(examples, desc=f"prompting ({config.mode})", unit="request")
    for ex in it:
        cands: list[Tool] = []
        if config.mode in ("docs", "both"):
            res = retriever.search([ex.request], config.n_docs)
            cands = [catalog.tools[i] for i in res.I[0] if i >= 0]
            if config.oracle:  # ceiling analysis: perfect retrieval
                cands = [catalog[ex.tool], *(t for t in cands if t.name != ex.tool)][:config.n_docs]
            hits.append(ex.tool in {t.name for t in cands})
        demos = demo_pool.select(ex.request, config.n_demos) if config.mode in ("demos", "both") and demo_pool \
            else []
        prompt = build_prompt(ex.request, config=config, count_tokens=count_tokens, demos=demos, candidates=cands)
        reply = ask(backend, prompt.messages, fmt, max_tokens=max_tokens)
        pred = extract_command(reply)
        comp, scored = score_prediction(ex.command, ex.request, pred, catalog)
        comps.append(comp)
        valid.append(scored["valid"])
        records.append({"id": ex.id, "request": ex.request, "gold": ex.command, "reply": reply, "format": fmt,
                        "pred": pred, "prompt_tokens": prompt.n_tokens, **scored,
                        "candidates": [t.name for t in cands], "demos": prompt.demos})
    return PromptingResult(config, aggregate(comps, valid), (sum(hits) / len(hits)) if hits else None, records,
                           time.perf_counter() - t0)
