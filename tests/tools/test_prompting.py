from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import ConfigError, DataError
from lmlab.tools.catalog import Catalog
from lmlab.tools.cloud_cli import CliExample
from lmlab.tools.manpages import ingest_manpages
from lmlab.tools.prompting import (
    SHOTS,
    DemoPool,
    PromptConfig,
    build_prompt,
    completion_prompt,
    doc_lines,
    prompt_format,
    usage_line,
)

FIX = Path(__file__).parent / "fixtures"
CAT = Catalog(ingest_manpages(FIX))
NAMES = ["apple", "banana", "cherry", "damson", "elder", "fig"]
DEMOS = [CliExample(str(i), f"Delete the {NAMES[i]} gadget right now", f"gcloud demo gadgets delete g{i} --force",
                    "gcloud demo gadgets delete", "gcloud demo gadgets", "train") for i in range(6)]


def words(messages):
    return sum(len(m["content"].split()) + 4 for m in messages)


def test_usage_line_shows_required_parts():
    u = usage_line(CAT["gcloud demo widgets create"])
    assert u == ("Usage: gcloud demo widgets create WIDGET_NAMES ... --zone=ZONE "
                 "(--source-image | --source-snapshot) [flags]")


def test_doc_rounds_priority():
    rounds = doc_lines(CAT["gcloud demo widgets create"])
    assert rounds[0][0] == "## gcloud demo widgets create" and rounds[1] == ["create a demo widget"]
    assert any("--zone=ZONE" in x for x in rounds[2])
    assert "One of: red, green, blue." in "".join(sum(rounds[3:], []))


def completion_words(messages):
    return len(completion_prompt(messages).split())


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(40, 400), mode=st.sampled_from(["none", "demos", "docs", "both"]),
       n_docs=st.integers(1, 3), n_demos=st.integers(0, 5), completion=st.booleans())
def test_prompt_never_exceeds_budget(budget, mode, n_docs, n_demos, completion):
    cfg = PromptConfig(mode=mode, budget=budget, n_docs=n_docs, n_demos=n_demos)
    count = completion_words if completion else words
    try:
        p = build_prompt("Create a red widget in zone a", config=cfg, count_tokens=count, demos=DEMOS,
                         candidates=list(CAT))
    except DataError:
        assert count([{"role": "system", "content": ""}]) < budget  # only when the bare request does not fit
        return
    assert p.n_tokens <= budget and p.n_tokens == count(p.messages)
    assert p.messages[-1]["content"].startswith("Documentation" if p.docs else "Request:")
    assert len(p.demos) <= n_demos and len(p.docs) <= n_docs
    if mode in ("none", "demos"):
        assert not p.docs
    if mode in ("none", "docs"):
        assert not p.demos
    if mode == "none":  # the zero-shot baseline: the system message and the request, nothing else
        assert [m["role"] for m in p.messages] == ["system", "user"]
        assert p.messages[1]["content"] == "Request: Create a red widget in zone a\nReply with the gcloud command only."


def test_mode_grid_zero_and_few_shot():
    assert SHOTS == {"none": "zero-shot", "demos": "few-shot", "docs": "zero-shot", "both": "few-shot"}
    cands = [CAT["gcloud demo gadgets delete"]]
    kinds = {}
    for mode in SHOTS:
        p = build_prompt("remove gadget g7", config=PromptConfig(mode=mode, budget=2000, n_demos=2, n_docs=1),
                         count_tokens=words, demos=DEMOS, candidates=cands)
        kinds[mode] = (bool(p.demos), bool(p.docs))
    assert kinds == {"none": (False, False), "demos": (True, False), "docs": (False, True), "both": (True, True)}


def test_completion_prompt_for_base_models():
    p = build_prompt("remove gadget g7", config=PromptConfig(mode="both", budget=2000, n_demos=1, n_docs=1),
                     count_tokens=words, demos=DEMOS, candidates=[CAT["gcloud demo gadgets delete"]])
    text = completion_prompt(p.messages)
    assert text.startswith("You translate requests into gcloud commands.")
    assert "Request: Delete the apple gadget right now\nCommand: gcloud demo gadgets delete g0 --force\n\n" in text
    assert "## gcloud demo gadgets delete" in text and "Reply with" not in text
    assert text.endswith("Request: remove gadget g7\nCommand: gcloud")


def test_prompt_format_auto_follows_the_chat_template():
    class Tok:
        chat_template = None

    class Backend:
        tokenizer = Tok()

    assert prompt_format(Backend(), PromptConfig()) == "completion"
    Tok.chat_template = "{{ messages }}"
    assert prompt_format(Backend(), PromptConfig()) == "chat"
    assert prompt_format(Backend(), PromptConfig(format="completion")) == "completion"
    assert prompt_format(object(), PromptConfig()) == "chat"  # HTTP backends have no local tokenizer
    with pytest.raises(ConfigError):
        PromptConfig(format="xml")


def test_best_ranked_candidate_gets_most_lines():
    cfg = PromptConfig(mode="docs", budget=150, n_docs=3)
    cands = [CAT["gcloud demo widgets create"], CAT["gcloud demo widgets list"], CAT["gcloud demo gadgets delete"]]
    p = build_prompt("make a widget", config=cfg, count_tokens=words, candidates=cands)
    counts = [p.docs.get(t.name, 0) for t in cands]
    assert counts[0] >= 2 and counts[0] >= counts[1]
    full = build_prompt("make a widget", config=PromptConfig(mode="docs", budget=4000, n_docs=3),
                        count_tokens=words, candidates=cands)
    assert sum(full.docs.values()) > sum(counts)


def test_demo_pool_and_config_errors():
    pool = DemoPool(DEMOS)
    assert pool.select("delete the damson gadget", 1)[0].id == "3"
    with pytest.raises(ConfigError):
        PromptConfig(mode="oracle")


def test_prompting_end_to_end_with_tiny_model(tiny):
    from lmlab.lm.backends import LocalHFBackend
    from lmlab.tools.prompting import evaluate_prompting
    from lmlab.tools.retrieve import BM25Retriever

    backend = LocalHFBackend(tiny.model, tiny.tokenizer)
    ex = [CliExample("x", "Delete the gadget called old-gadget", "gcloud demo gadgets delete old-gadget --force",
                     "gcloud demo gadgets delete", "gcloud demo gadgets", "test")]
    res = evaluate_prompting(backend, ex, CAT, config=PromptConfig(mode="both", budget=2000, n_docs=2, n_demos=1),
                             retriever=BM25Retriever(CAT), demo_pool=DemoPool(DEMOS), max_tokens=4)
    assert res.scores.n == 1 and res.retrieval_recall == 1.0
    assert res.records[0]["prompt_tokens"] <= 2000 and res.records[0]["candidates"][0] == "gcloud demo gadgets delete"
    # the byte tokenizer has no chat template: completion format, reply prefilled with "gcloud"
    assert res.records[0]["format"] == "completion" and res.records[0]["reply"].startswith("gcloud")
    assert "\n" not in res.records[0]["reply"]
    chat = evaluate_prompting(backend, ex, CAT, config=PromptConfig(mode="none", budget=2000, format="chat"),
                              max_tokens=4)
    assert chat.records[0]["format"] == "chat" and chat.records[0]["candidates"] == [] and chat.retrieval_recall is None


def test_oracle_puts_gold_first(tiny):
    from lmlab.lm.backends import LocalHFBackend
    from lmlab.tools.prompting import evaluate_prompting
    from lmlab.tools.retrieve import BM25Retriever

    ex = [CliExample("y", "List the red widgets", "gcloud demo gadgets delete g1",
                     "gcloud demo gadgets delete", "gcloud demo gadgets", "test")]
    kw = dict(retriever=BM25Retriever(CAT), max_tokens=2)
    plain = evaluate_prompting(LocalHFBackend(tiny.model, tiny.tokenizer), ex, CAT,
                               config=PromptConfig(mode="docs", n_docs=1), **kw)
    oracle = evaluate_prompting(LocalHFBackend(tiny.model, tiny.tokenizer), ex, CAT,
                                config=PromptConfig(mode="docs", n_docs=1, oracle=True), **kw)
    assert plain.records[0]["candidates"] == ["gcloud demo widgets list"] and plain.retrieval_recall == 0.0
    assert oracle.records[0]["candidates"] == ["gcloud demo gadgets delete"] and oracle.retrieval_recall == 1.0


def test_rescore_stored_records_with_the_current_scorer():
    from lmlab.tools.prompting import rescore

    gold = "gcloud demo widgets create w1 --zone=ZONE --source-image=i --color=red"
    records = [
        {"id": "a", "request": "Create w1", "gold": gold, "pred": "gcloud demo widgets create w1 --zone=us-east1-b "
         "--source-image=i --color=red", "exact": False, "valid": False, "feedback": ["stale"], "reply": "kept"},
        {"id": "b", "request": "Create w1", "gold": gold, "pred": "gcloud demo widgets create w1 --zone=us-east1-b "
         "--source-image=i --color=GREEN", "exact": True, "valid": False},  # a constant, not a placeholder
        {"id": "c", "request": "Create w1", "gold": gold, "pred": None, "exact": True},
    ]
    scores, out = rescore(records, CAT)
    assert [r["exact"] for r in out] == [True, False, False] and [r["valid"] for r in out] == [True, True, False]
    assert out[0]["feedback"] == [] and out[0]["reply"] == "kept" and out[2]["feedback"] == [
        "no gcloud command in the reply"]
    assert scores.n == 3 and scores.exact_match == pytest.approx(1 / 3) and scores.parse_rate == pytest.approx(2 / 3)
    assert records[0]["exact"] is False  # the stored records are not modified in place
