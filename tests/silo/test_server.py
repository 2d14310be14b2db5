"""The SILO service on a real loopback port: generate with attribution, score, opt-out auth + audit, errors, load."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lmlab.lm.server import serve_in_thread
from lmlab.silo import Datastore, KnnLMConfig
from lmlab.silo.server import SiloService, create_app

torch.set_num_threads(1)
TOKEN = "s3cret-admin"


@pytest.fixture()
def served(store, tiny, tmp_path):
    service = SiloService(tiny, store, KnnLMConfig(k=16, lmbda=0.5), audit_log=tmp_path / "audit.jsonl")
    with serve_in_thread(create_app(service, admin_token=TOKEN)) as url:
        yield url, service


def test_generate_score_stats(served, planted_text):
    url, service = served
    r = httpx.post(f"{url}/generate", json={"prompt": planted_text[:30], "max_tokens": 6, "top": 2}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["tokens"]) == 6 and body["text"]
    nb = body["tokens"][0]["neighbours"]
    assert nb and {"doc_id", "source", "license", "license_class", "offset", "snippet", "share"} <= set(nb[0])
    s = httpx.post(f"{url}/score", json={"text": planted_text, "attribute": True}, timeout=60).json()
    assert s["ppl"] < s["ppl_lm"] and len(s["tokens"]) == s["tokens_scored"]
    st = httpx.get(f"{url}/datastore").json()
    assert st["entries"] == service.datastore.n_entries and st["live_entries"] == st["entries"]
    assert httpx.get(f"{url[:-3]}/openapi.json").json()["paths"].keys() >= {"/v1/generate", "/v1/optout"}


def test_invalid_requests_get_4xx_with_a_message(served):
    url, _ = served
    cases = [("/generate", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
             ("/generate", {"max_tokens": 3}, 422, "prompt"),
             ("/generate", {"prompt": "x", "lmbda": 2}, 422, "lmbda"),
             ("/generate", {"prompt": "x" * 300, "max_tokens": 10}, 400, "positions"),
             ("/score", {"text": ""}, 422, "text"),
             ("/score", {"text": "a"}, 400, "2 tokens"),
             ("/optout", {}, 422, "doc_ids"),
             ("/generate", {"prompt": "x", "seed": 2**64, "temperature": 1}, 422, "seed"),
             ("/generate", {"prompt": "x", "seed": -1, "temperature": 1}, 422, "seed")]
    for path, body, status, words in cases:
        r = httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == status, (path, body, r.text)
        assert words in r.json()["error"]["message"]


def test_optout_needs_the_token_is_audited_and_persists(served, tiny, planted_text):
    url, service = served
    body = {"doc_ids": ["planted"], "reason": "owner request"}
    assert httpx.post(f"{url}/optout", json=body).status_code == 401
    assert httpx.post(f"{url}/optout", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(f"{url}/optout", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["documents"] == 1
    r = httpx.post(f"{url}/optout", json={"doc_ids": ["nope"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and "no datastore document" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/optout", json={"sources": ["*"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and "match every document" in r.json()["error"]["message"]
    assert len(service.datastore) > 0
    log = [json.loads(line) for line in service.audit_log.read_text().splitlines()]
    assert [e["outcome"] for e in log] == ["unauthorized", "unauthorized", "removed", "rejected", "rejected"]
    assert log[2]["request"]["reason"] == "owner request" and log[2]["client"] == "127.0.0.1"
    s = httpx.post(f"{url}/score", json={"text": planted_text, "attribute": True}, timeout=60).json()
    assert all(n["doc_id"] != "planted" for t in s["tokens"] for n in t["neighbours"])
    assert Datastore.load(service.datastore.folder, tiny).removed_docs.sum() == 1  # survives a restart


def test_optout_disabled_without_a_token(store, tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("LMLAB_SILO_ADMIN_TOKEN", raising=False)
    service = SiloService(tiny, store, audit_log=tmp_path / "a.jsonl")
    with serve_in_thread(create_app(service)) as url:
        r = httpx.post(f"{url}/optout", json={"doc_ids": ["planted"]}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 403 and "LMLAB_SILO_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_fifty_concurrent_requests(served, docs):
    url, service = served
    prompts = [d.text[:12] for d in docs]
    with httpx.Client(timeout=120) as c:
        want = {p: c.post(f"{url}/generate", json={"prompt": p, "max_tokens": 4}).json()["text"] for p in prompts}

    def call(i):
        p = prompts[i % len(prompts)]
        if i % 5 == 4:
            return "stats", httpx.get(f"{url}/datastore", timeout=120).json()["entries"]
        return p, httpx.post(f"{url}/generate", json={"prompt": p, "max_tokens": 4}, timeout=120).json()["text"]

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(call, range(50)))
    for key, value in results:
        assert value == (service.datastore.n_entries if key == "stats" else want[key])


def test_tiny_sampling_temperature_is_answered(served):
    url, _ = served
    r = httpx.post(f"{url}/generate", json={"prompt": "Note 3", "max_tokens": 3, "temperature": 1e-40}, timeout=60)
    g = httpx.post(f"{url}/generate", json={"prompt": "Note 3", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["text"] == g.json()["text"]  # below 1e-5: greedy


def test_server_sees_an_optout_made_by_another_process(served, tiny, planted_text):
    url, service = served
    Datastore.load(service.datastore.folder).optout(doc_ids=["planted"])  # what `lmlab silo optout` does
    st = httpx.get(f"{url}/datastore").json()
    assert st["live_documents"] == st["documents"] - 1 and st["tombstones"]["doc_ids"] == ["planted"]
    s = httpx.post(f"{url}/score", json={"text": planted_text, "attribute": True}, timeout=60).json()
    assert all(n["doc_id"] != "planted" for t in s["tokens"] for n in t["neighbours"])
    r = httpx.post(f"{url}/optout", json={"doc_ids": ["doc00"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["tombstones"]["doc_ids"] == ["doc00", "planted"]
    assert Datastore.load(service.datastore.folder, tiny).removed_docs.sum() == 2  # neither overwrote the other


def test_a_failed_optout_is_audited_answered_in_json_and_can_be_retried(store, tiny, docs, tmp_path, monkeypatch,
                                                                        disk_full):
    import lmlab.silo.datastore as datastore
    import lmlab.silo.ric_lm as ric_lm
    from lmlab.silo.ric_lm import RicLM

    ric = RicLM.build(docs, tiny.tokenizer, tmp_path / "ric", block_tokens=32)
    service = SiloService(tiny, store, KnnLMConfig(k=16, lmbda=0.5), ric=ric, audit_log=tmp_path / "audit.jsonl")
    auth = {"Authorization": f"Bearer {TOKEN}"}

    with serve_in_thread(create_app(service, admin_token=TOKEN)) as url:
        for module in (datastore, ric_lm):  # the datastore's write fails; then, the datastore done, the RIC's
            with monkeypatch.context() as m:
                m.setattr(module, "write_json_atomic", disk_full)
                r = httpx.post(f"{url}/optout", json={"doc_ids": ["planted"]}, headers=auth, timeout=60)
            assert r.status_code == 500 and "No space left" in r.json()["error"]["message"]
            st = httpx.get(f"{url}/datastore").json()  # answers, and claims no more than the disk holds
            assert st["tombstones"]["doc_ids"] == Datastore.load(store.folder).manifest["tombstones"]["doc_ids"]
        r = httpx.post(f"{url}/optout", json={"doc_ids": ["planted"]}, headers=auth, timeout=60)
        assert r.status_code == 200
    log = [json.loads(line) for line in service.audit_log.read_text().splitlines()]
    assert [e["outcome"] for e in log] == ["failed", "failed", "removed"]
    assert "No space left" in log[0]["message"] and log[1]["documents"] == 1  # the datastore's part was done
    assert RicLM.load(ric.folder).removed_docs.sum() == 1 == Datastore.load(store.folder).removed_docs.sum()


def test_serve_on_a_taken_port_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import socket

    from lmlab.cli import main

    monkeypatch.setattr("lmlab.lm.models.load", lambda *a, **k: pytest.fail("loaded a model before binding"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for host, why in (("127.0.0.1", "in use"), ("999.1.1.1", "999.1.1.1")):  # uvicorn: rc 3 and its log
            assert main(["silo", "serve", "--datastore", str(tmp_path), "--model", "tiny:micro", "--host", host,
                         "--port", port]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"lmlab: error: cannot listen on {host}:{port}: ") and why in err
            assert err.count("\n") == 1
