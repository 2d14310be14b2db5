"""The offloaded MoE engine: identical outputs across policies/tiers, budgets, misses, prefetch, shutdown, errors."""

import copy
import gc
import os
import threading
import time

import pytest
import torch

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.moe.offload import (
    POLICIES,
    THREAD_NAME,
    ExpertStore,
    LinkTier,
    OffloadConfig,
    OffloadEngine,
    PageCacheTier,
    make_tier,
    save_expert_store,
)
from lmlab.moe.pregated import build

torch.set_num_threads(1)

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, expert_hidden_size=64, num_experts=4,
             num_experts_per_tok=2, max_position_embeddings=64)
E, K, L = 4, 2, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build(pregated=True, vocab_size=40, seed=1, **SMALL)
    path = save_expert_store(model, tmp_path_factory.mktemp("store") / "experts.safetensors")
    return model, path


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def _gen(model, path, policy, tier="mmap", lru=0, batch=1, prompt=None, n=5):
    prompt = prompt if prompt is not None else torch.arange(batch * 4).reshape(batch, 4) % 40
    with OffloadEngine(model, path, tier=make_tier(tier, gbps=50.0, latency_us=1.0),
                       config=OffloadConfig(policy=policy, lru_slots=lru, max_batch=batch)) as eng:
        return eng.generate(prompt, n, return_logits=True)


@pytest.mark.parametrize("batch", [1, 2])
def test_every_policy_and_tier_gives_identical_tokens_and_logits(setup, batch):
    model, path = setup
    ref = _gen(model, path, "resident", batch=batch)
    for policy in POLICIES:
        for tier in ("mmap", "disk", "link"):
            for lru in (0, 3):
                r = _gen(model, path, policy, tier, lru, batch=batch)
                assert torch.equal(r.tokens, ref.tokens), (policy, tier, lru)
                for a, b in zip(r.logits, ref.logits, strict=True):  # token by token
                    assert torch.equal(a, b), (policy, tier, lru)
    assert not _prefetch_threads()


@pytest.mark.parametrize("policy", ["resident", "pregated"])
def test_unequal_prompts_continue_as_they_would_alone(setup, policy):
    model, path = setup
    prompts = [[3, 14, 15, 9, 2, 6], [7, 1, 8], [2, 7, 1, 8]]
    alone = [_gen(model, path, "resident", prompt=torch.tensor([q]), n=5) for q in prompts]
    with OffloadEngine(model, path, tier=make_tier("mmap"),
                       config=OffloadConfig(policy=policy, max_batch=3)) as eng:
        seen, experts_of = [], eng._experts_of
        eng._experts_of = lambda routing, live: seen.append(live) or experts_of(routing, live)
        r = eng.generate(prompts, 5, return_logits=True)
    # the prefill routes only the prompts' real tokens (13 of 3 x 6 positions), every decode step every row
    assert [int(m.sum()) for m in seen[:model.config.num_hidden_layers]] == [13] * model.config.num_hidden_layers
    assert all(bool(m.all()) for m in seen[model.config.num_hidden_layers:])
    idx = torch.tensor([[[0, 1], [2, 3]]])  # one row, two tokens: the second is padding
    assert OffloadEngine._experts_of((idx, None), torch.tensor([[True, False]])) == [0, 1]
    for row, a in enumerate(alone):
        assert torch.equal(r.tokens[row], a.tokens[0]), row
        for got, want in zip(r.logits, a.logits, strict=True):
            torch.testing.assert_close(got[row], want[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError), OffloadEngine(model, path, config=OffloadConfig(max_batch=2)) as eng:
        eng.generate([[1, 2], []], 2)


@pytest.mark.parametrize("policy", POLICIES)
def test_prefill_streams_a_long_prompt_within_the_budget(setup, policy):
    model, path = setup
    L, E = model.config.num_hidden_layers, model.config.num_experts
    prompt = torch.arange(24)[None] % 40  # 24 tokens: every block needs (nearly) all E experts
    r = _gen(model, path, policy, prompt=prompt, n=4)
    m = r.metrics
    assert m.peak_resident_experts <= m.slots and m.prefill_s > 0 and m.steps == 3 == len(m.token_latency_s)
    assert len(m.block_latency_s) == m.steps and all(0 < b < t for b, t in zip(m.block_latency_s, m.token_latency_s,
                                                                              strict=True))
    if policy == "resident":
        assert m.prefill_loads == 0
    else:  # each block's union, loaded once, in groups that fit the resident set
        assert L <= m.prefill_loads <= L * E and m.prefill_bytes == m.prefill_loads * ExpertStore(path).expert_bytes
    with torch.no_grad():  # same numbers as the model's own full forward
        want = model(input_ids=torch.cat([prompt, r.tokens[:, :-1]], 1)).logits[0, prompt.shape[1] - 1:]
    torch.testing.assert_close(torch.cat(r.logits), want, atol=1e-5, rtol=1e-5)


def test_engine_matches_full_forward(setup):
    model, path = setup
    prompt = torch.tensor([[3, 14, 15, 9, 2, 6]])
    r = _gen(model, path, "pregated", prompt=prompt, n=6)
    full = torch.cat([prompt, r.tokens], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full).logits[0, prompt.shape[1] - 1:-1]
    assert torch.allclose(logits, torch.cat(r.logits), atol=1e-5)
    assert torch.equal(logits.argmax(-1), r.tokens[0])


def test_engine_routing_equals_model_routing(setup):
    model, path = setup
    with OffloadEngine(model, path, config=OffloadConfig(policy="on_demand")) as eng:
        logits = torch.randn(2, 3, E)
        idx, gates = eng._route(logits)
        ref = model.route(logits)
        assert torch.equal(idx, ref.expert_index) and torch.equal(gates, ref.gates)


@pytest.mark.parametrize("policy,budget", [("on_demand", K), ("prefetch_all", E + K), ("pregated", 2 * K),
                                           ("resident", L * E)])
def test_resident_set_never_exceeds_budget(setup, policy, budget):
    model, path = setup
    seen = []
    with OffloadEngine(model, path, config=OffloadConfig(policy=policy)) as eng:
        assert eng.pool.num_slots == budget
        orig = eng.pool.reserve

        def spy(key):
            slot = orig(key)
            seen.append(eng.pool.occupied)
            return slot

        eng.pool.reserve = spy
        r = eng.generate([1, 2, 3], 6)
    assert max(seen, default=r.metrics.peak_resident_experts) <= budget
    assert r.metrics.peak_resident_experts <= budget and r.metrics.slot_bytes == budget * eng.store.expert_bytes
    if policy == "pregated":  # the target: peak expert memory <= 2x the active experts of a block
        assert r.metrics.peak_resident_experts <= 2 * r.metrics.active_experts_per_block


def test_pregated_prefetches_next_block_and_first_block_loads_on_demand(setup):
    model, path = setup
    r = _gen(model, path, "pregated", n=6)
    m = r.metrics
    assert m.misses_per_block[0] > 0  # block 0 has no predecessor: on demand
    assert m.misses_per_block[1:] == [0] * (L - 1)  # every later block was prefetched by its predecessor
    assert m.prefetches + m.misses == m.loads and m.bytes_moved == m.loads * ExpertStore(path).expert_bytes
    assert m.hits + m.late + m.misses == m.needed and 0 < m.hit_rate < 1
    od = _gen(model, path, "on_demand", n=6).metrics
    assert od.prefetches == 0 and od.misses == od.needed and od.hit_rate == 0
    pa = _gen(model, path, "prefetch_all", n=6).metrics
    assert pa.misses_per_block[1:] == [0] * (L - 1) and pa.bytes_moved >= m.bytes_moved
    res = _gen(model, path, "resident", n=6).metrics
    assert res.misses == 0 and res.hit_rate == 1 and res.bytes_moved == 0


def test_lru_keeps_recent_experts(setup):
    model, path = setup
    plain = _gen(model, path, "on_demand", n=8).metrics
    cached = _gen(model, path, "on_demand", lru=L * E, n=8).metrics  # room for everything: only cold misses
    assert cached.misses <= L * E < plain.misses and cached.hits > 0


class GatedTier(PageCacheTier):
    """Blocks the first load until ``gate`` is set (to hold the prefetch thread inside a load)."""

    def __init__(self):
        self.gate, self.entered, self.calls = threading.Event(), threading.Event(), 0

    def load(self, store, layer, expert, dst):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.gate.wait(10)
        return super().load(store, layer, expert, dst)


def test_prefetch_miss_falls_back_to_sync_load_and_is_counted(setup):
    model, path = setup
    tier = GatedTier()
    with OffloadEngine(model, path, tier=tier, config=OffloadConfig(policy="pregated")) as eng:
        eng._reset_counters()
        eng.prefetch(1, [0, 1])  # the thread takes expert 0 and blocks; expert 1 stays queued
        assert tier.entered.wait(10)
        assert eng.cancel() == 1  # expert 1's queued prefetch is dropped, its slot freed
        tier.gate.set()
        slots = eng.ensure(1, [0, 1])
        assert eng.misses == 1 and eng.misses_per_block[1] == 1 and eng.hits + eng.late == 1
        for e, s in slots.items():  # the fallback loaded the right bytes
            for got, want in zip((eng.pool.w1[s], eng.pool.b1[s], eng.pool.w2[s], eng.pool.b2[s]),
                                 eng.store.view(1, e), strict=True):
                assert torch.equal(got, want)
        eng.release(1)
    assert not _prefetch_threads()


def test_late_prefetch_is_taken_over_by_the_main_thread(setup):
    model, path = setup
    tier = GatedTier()
    with OffloadEngine(model, path, tier=tier, config=OffloadConfig(policy="pregated")) as eng:
        eng._reset_counters()
        eng.prefetch(2, [2, 3])
        assert tier.entered.wait(10)
        threading.Timer(0.2, tier.gate.set).start()
        slots = eng.ensure(2, [3, 2])  # expert 3 is still queued: stolen; expert 2 is in flight: waited for
        assert eng.stolen == 1 and eng.late == 2 and eng.misses == 0 and eng.stall_s > 0
        for e, s in slots.items():
            assert torch.equal(eng.pool.w1[s], eng.store.view(2, e)[0])
        eng.release(2)


def test_shutdown_with_a_load_in_flight_leaves_no_thread(setup):
    model, path = setup
    tier = GatedTier()
    eng = OffloadEngine(model, path, tier=tier, config=OffloadConfig(policy="prefetch_all"))
    assert len(_prefetch_threads()) == 1
    eng.prefetch(1, range(E))
    assert tier.entered.wait(10)
    threading.Timer(0.2, tier.gate.set).start()
    t0 = time.perf_counter()
    eng.close()  # cancels the queued loads, waits for the one in flight, joins the thread
    assert time.perf_counter() - t0 < 10
    assert not _prefetch_threads() and not eng._copier._jobs
    eng.close()  # idempotent
    with pytest.raises(ConfigError):
        eng.generate([1, 2], 2)


@pytest.mark.parametrize("policy", ["prefetch_all", "pregated"])
def test_copy_process_and_thread_give_identical_outputs(setup, policy):
    model, path = setup
    ref = _gen(model, path, "resident", n=6)
    for copier in ("process", "thread"):
        with OffloadEngine(model, path, tier=make_tier("link", gbps=50.0, latency_us=1.0),
                           config=OffloadConfig(policy=policy, copier=copier)) as eng:
            r = eng.generate(torch.arange(4)[None], 6, return_logits=True)
        assert r.metrics.copier == copier and r.metrics.prefetches > 0, copier
        assert torch.equal(r.tokens, ref.tokens)
        assert all(torch.equal(a, b) for a, b in zip(r.logits, ref.logits, strict=True))
        assert r.metrics.bytes_moved == r.metrics.loads * ExpertStore(path).expert_bytes


def test_copier_choice(setup):
    model, path = setup
    kinds = {}
    for policy, tier in (("pregated", make_tier("mmap")), ("pregated", make_tier("disk")), ("on_demand", None),
                         ("pregated", GatedTier())):
        with OffloadEngine(model, path, tier=tier, config=OffloadConfig(policy=policy)) as eng:
            kinds[(policy, type(eng.tier).__name__)] = eng._copier.kind if eng._copier else None
    assert kinds == {("pregated", "PageCacheTier"): "process", ("pregated", "DiskTier"): "process",
                     ("on_demand", "PageCacheTier"): None, ("pregated", "GatedTier"): "thread"}
    with pytest.raises(ConfigError, match="copier='thread'"):
        OffloadEngine(model, path, tier=GatedTier(), config=OffloadConfig(policy="pregated", copier="process"))
    with pytest.raises(ConfigError, match="unknown copier"):
        OffloadConfig(copier="carrier-pigeon")


def test_copier_falls_back_to_a_thread_where_no_process_can_start(setup, monkeypatch):
    import lmlab.moe.offload.copier as copier

    model, path = setup
    monkeypatch.setattr(copier.sys, "executable", "/nonexistent/python")
    with OffloadEngine(model, path, config=OffloadConfig(policy="pregated")) as eng:
        assert eng._copier.kind == "thread"
        assert eng.generate([1, 2, 3], 3).metrics.copier == "thread"
    with pytest.raises(ConfigError, match="cannot start the expert copy process"):
        OffloadEngine(model, path, config=OffloadConfig(policy="pregated", copier="process"))


def test_copy_process_is_reaped_on_close_even_with_copies_in_flight(setup):
    model, path = setup
    eng = OffloadEngine(model, path, config=OffloadConfig(policy="prefetch_all", copier="process"))
    proc = eng._copier.proc
    assert proc.poll() is None
    eng.prefetch(1, range(E))  # in flight or queued in the child's pipe
    eng.close()
    assert proc.poll() is not None and not _prefetch_threads()
    eng.close()  # idempotent
    eng = OffloadEngine(model, path, config=OffloadConfig(policy="pregated", copier="process"))
    proc = eng._copier.proc
    del eng  # never closed: collecting the engine still stops its copy process
    gc.collect()
    assert proc.poll() is not None


def test_copy_process_failures_are_clear_errors(setup, tmp_path):
    model, path = setup
    with OffloadEngine(model, path, config=OffloadConfig(policy="pregated", copier="process")) as eng:
        eng._copier.proc.kill()
        eng._copier.proc.wait()
        with pytest.raises(RuntimeError, match="copy process exited"):  # seen when the jobs are written
            eng.prefetch(1, [0, 1])
        eng._copier._pending.add(0)  # ... or while waiting for a copy the child will never finish
        with pytest.raises(RuntimeError, match="copy process exited"):
            eng._copier.wait(0)
    cut = tmp_path / "experts.safetensors"
    cut.write_bytes(path.read_bytes())
    with OffloadEngine(model, cut, config=OffloadConfig(policy="pregated", copier="process")) as eng:
        last = max(eng.store.spans.values())
        os.truncate(cut, last + 8)  # the file shrinks under the engine: the last expert reads short
        key = next(k for k, v in eng.store.spans.items() if v == last)
        eng.prefetch(key[0], [key[1]])
        with pytest.raises(DataError, match="short read"):
            eng.ensure(key[0], [key[1]])


def test_copy_worker_fails_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    import lmlab.moe.offload.copier as copier

    worker = Path(copier.__file__).with_name("_copy_worker.py")
    r = subprocess.run([sys.executable, "-I", "-S", str(worker), "999", "998", "997", "996", "16", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_link_tier_is_serial_and_bandwidth_limited(setup):
    model, path = setup
    tier = LinkTier(0.005, latency_us=100)  # 5 MB/s: one 17 kB expert ~ 3.6 ms, next to ~0.05 ms of compute
    with OffloadEngine(model, path, tier=tier, config=OffloadConfig(policy="on_demand")) as eng:
        r = eng.generate([1, 2, 3], 3)
        per = tier.transfer_s(eng.store.expert_bytes)
    # a block's misses arrive one after another; only the compute of its earlier experts overlaps the later ones
    assert r.metrics.stall_s >= 0.95 * r.metrics.misses * per


@pytest.mark.parametrize("copier", ["process", "thread"])
@pytest.mark.parametrize("policy", ["on_demand", "prefetch_all", "pregated"])
def test_generate_after_an_interrupted_generate(setup, policy, copier):
    """Ctrl-C in the middle of a step leaves slots pinned and prefetches in flight; the next generate on the same
    engine still fits its budget and gives the tokens a fresh engine gives."""
    model, path = setup
    ref = _gen(model, path, "resident", prompt=[[5, 6, 7]], n=4).tokens
    with OffloadEngine(model, path, tier=make_tier("link", gbps=50.0, latency_us=1.0),
                       config=OffloadConfig(policy=policy, copier=copier)) as eng:
        moe, calls = eng._moe, []

        def interrupted(*a, **k):
            calls.extend([1] if k.get("wait") else [])  # decode steps only (the prefill waits in ensure)
            if len(calls) == 2:  # block 1 of the first decode step: its and block 2's slots are pinned
                raise KeyboardInterrupt
            return moe(*a, **k)

        eng._moe = interrupted
        with pytest.raises(KeyboardInterrupt):
            eng.generate([5, 6, 7], 4)
        assert eng._held  # the interrupted step left pins behind
        eng._moe = moe
        assert torch.equal(eng.generate([5, 6, 7], 4).tokens, ref)
        assert eng.pool.occupied <= eng.pool.num_slots


@pytest.mark.parametrize("copier", ["process", "thread"])
def test_interrupt_between_reserve_and_copy_leaves_no_stale_expert(setup, copier):
    """Interrupted after a prefetch reserved its slots but before the copier got the jobs: with an LRU cache the
    reserved keys must not survive as cached experts whose bytes were never loaded."""
    model, path = setup
    ref = _gen(model, path, "resident", prompt=[[5]], n=12).tokens
    with OffloadEngine(model, path, tier=make_tier("link", gbps=50.0, latency_us=1.0),
                       config=OffloadConfig(policy="pregated", lru_slots=64, copier=copier)) as eng:
        submit = eng._copier.submit  # the first prefetch the decode has to copy is interrupted
        eng._copier.submit = lambda jobs: (_ for _ in ()).throw(KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            eng.generate([5], 12)
        eng._copier.submit = submit
        assert torch.equal(eng.generate([5], 12).tokens, ref)


@pytest.mark.parametrize("policy", ["on_demand", "pregated"])
def test_decode_runs_each_expert_as_soon_as_it_arrives(setup, policy):
    """A block's first expert computes while the second is still on the link: wait, run, wait, run."""
    model, path = setup
    tier = LinkTier(0.05, latency_us=10)
    events = []
    with OffloadEngine(model, path, tier=tier, config=OffloadConfig(policy=policy)) as eng:
        wait_for, act = eng.wait_for, eng.act
        eng.wait_for = lambda slot: (events.append("wait"), wait_for(slot))[1]
        eng.act = lambda h: (events.append("run"), act(h))[1]
        eng.generate([1, 2, 3], 3)
    k = model.config.num_experts_per_tok
    decode = events[-2 * k * model.config.num_hidden_layers:]  # the last step: every block's k experts
    assert decode == ["wait", "run"] * (k * model.config.num_hidden_layers)


def test_disk_tier_evicts_before_every_read(setup, monkeypatch):
    model, path = setup
    calls = []
    orig = ExpertStore.evict
    monkeypatch.setattr(ExpertStore, "evict", lambda self, layer, e: (calls.append((layer, e)), orig(self, layer, e)))
    r = _gen(model, path, "on_demand", tier="disk", n=3)
    assert len(calls) == r.metrics.prefill_loads + r.metrics.loads > r.metrics.loads > 0


def test_store_is_plain_safetensors(setup):
    from safetensors import safe_open

    model, path = setup
    store = ExpertStore(path)
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("layers.2.experts.3.w2"), store.view(2, 3)[2])
    assert torch.equal(store.view(1, 2)[0], model.layers[1].experts.w1[2])
    store.close()


def test_missing_truncated_and_mismatched_store(setup, tmp_path):
    model, path = setup
    with pytest.raises(DataError, match="does not exist"):
        ExpertStore(tmp_path / "nope.safetensors")
    with pytest.raises(DataError, match="is a folder, not a file"):
        ExpertStore(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        ExpertStore(bad)
    bad.write_bytes(data[:5])
    with pytest.raises(DataError, match="truncated"):
        OffloadEngine(model, bad)
    other = build(pregated=True, vocab_size=40, **{**SMALL, "num_experts": 8})
    with pytest.raises(ManifestMismatchError):
        OffloadEngine(other, path)


def test_user_errors(setup):
    model, path = setup
    conv = build(pregated=False, vocab_size=40, **SMALL)
    with pytest.raises(ConfigError, match="pre-gated model"):
        OffloadEngine(conv, path, config=OffloadConfig(policy="pregated"))
    with pytest.raises(ConfigError):
        OffloadConfig(policy="psychic")
    with pytest.raises(ConfigError):
        make_tier("floppy")
    for gbps, latency in ((float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("nan")), (0.0, 1.0)):
        with pytest.raises(ConfigError, match="link needs gbps > 0"):
            make_tier("link", gbps=gbps, latency_us=latency)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            make_tier("cuda")
    with OffloadEngine(model, path, config=OffloadConfig(policy="on_demand")) as eng:
        with pytest.raises(ConfigError, match="max_batch"):
            eng.generate(torch.zeros(2, 3, dtype=torch.long), 2)
        with pytest.raises(ConfigError, match="max_position"):
            eng.generate([1, 2], 100)


def test_conventional_model_runs_offloaded(setup, tmp_path):
    conv = build(pregated=False, vocab_size=40, seed=2, **SMALL)
    path = save_expert_store(conv, tmp_path / "conv.safetensors")
    ref = _gen(conv, path, "resident")
    for policy in ("on_demand", "prefetch_all"):
        assert torch.equal(_gen(conv, path, policy).tokens, ref.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tier_matches_resident(tmp_path):
    model = build(pregated=True, vocab_size=40, seed=1, **SMALL)
    path = save_expert_store(model, tmp_path / "experts.safetensors")
    out = {}
    for policy in POLICIES:
        with OffloadEngine(model, path, tier=make_tier("cuda"),
                           config=OffloadConfig(policy=policy, device="cuda")) as eng:
            out[policy] = eng.generate([1, 2, 3], 5, return_logits=True)
    for policy in POLICIES:
        assert torch.equal(out[policy].tokens, out["resident"].tokens)
        assert all(torch.equal(a, b) for a, b in zip(out[policy].logits, out["resident"].logits, strict=True))


def test_generate_command(tmp_path):
    import json

    from click.testing import CliRunner

    from lmlab.lm.tokenizer import byte_tokenizer
    from lmlab.moe.offload.cli import generate_cmd

    tok = byte_tokenizer()
    model = build(pregated=True, vocab_size=len(tok), seed=0, **SMALL)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = CliRunner().invoke(generate_cmd, [str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "4",
                                            "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["new_tokens"] == 4 and d["policy"] == "pregated" and d["misses_per_block"][1:] == [0, 0]
    assert d["copier"] == "process"
    assert (tmp_path / "m" / "experts.safetensors").is_file()
    out = CliRunner().invoke(generate_cmd, [str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "4",
                                            "--json", "--copier", "thread"])
    assert out.exit_code == 0 and json.loads(out.stdout)["copier"] == "thread", out.output
    out = CliRunner().invoke(generate_cmd, [str(tmp_path / "m"), "--prompt", "hello there", "--prompt", "hi",
                                            "--max-new-tokens", "3", "--policy", "on_demand"])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("hello there") and lines[1].startswith("hi")
    out = CliRunner().invoke(generate_cmd, [str(tmp_path / "m"), "--prompt", ""])
    assert out.exit_code != 0 and "at least one token" in out.output


def test_bf16_model_runs_offloaded(tmp_path):
    """A bf16 model (bf16 store): every policy gives the tokens of the model's own greedy forward."""
    model = build(pregated=True, vocab_size=40, seed=1, **SMALL).to(torch.bfloat16)
    with torch.no_grad():
        for gate in (g for blk in model.layers for g in (blk.router, blk.pregate) if g is not None):
            gate.weight.mul_(30)  # decisive gates: near-uniform probabilities would tie in bf16
    path = save_expert_store(model, tmp_path / "bf16.safetensors")
    assert ExpertStore(path).dtype == torch.bfloat16
    prompt = torch.tensor([[3, 14, 15, 9]])
    ref = _gen(model, path, "resident", prompt=prompt)
    for policy in ("on_demand", "prefetch_all", "pregated"):
        assert torch.equal(_gen(model, path, policy, prompt=prompt).tokens, ref.tokens), policy
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, ref.tokens], 1)).logits[0, prompt.shape[1] - 1:-1]
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(ref.logits).float(), logits.float(), atol=0.02, rtol=0.02)


def test_store_from_other_weights_of_the_same_shape_is_refused(setup, tmp_path):
    model, path = setup
    other = build(pregated=True, vocab_size=40, seed=7, **SMALL)  # same shape, other weights
    assert ExpertStore(path).matches(model) is True and ExpertStore(path).matches(other) is False
    with pytest.raises(ManifestMismatchError, match="other expert weights"):
        OffloadEngine(other, path)
    with torch.no_grad():
        other.layers[2].experts.b2[3, 0] += 1  # one value changed in place: the cached fingerprint notices
    with pytest.raises(ManifestMismatchError, match="other expert weights"):
        OffloadEngine(other, save_expert_store(model, tmp_path / "again.safetensors"))
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ManifestMismatchError, match="other expert weights"):
        OffloadEngine(half, path)  # the dtype is part of the fingerprint


def test_store_without_fingerprint_is_checked_by_shape(setup, tmp_path):
    """Stores written before fingerprints still open; their source is unknown (matches() is None)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, path = setup
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "fingerprint"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    assert ExpertStore(old).fingerprint is None and ExpertStore(old).matches(model) is None
    assert torch.equal(_gen(model, old, "pregated").tokens, _gen(model, path, "pregated").tokens)


def test_failed_construction_closes_what_it_opened(setup, monkeypatch):
    """An engine whose construction fails closes the store it opened and stops the copier it started."""
    import lmlab.moe.offload.engine as engine_module

    model, path = setup
    other = build(pregated=True, vocab_size=40, **{**SMALL, "num_experts": 8})

    def fds_on_store():
        return sum(1 for f in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{f}") == str(path))

    before = fds_on_store()
    for _ in range(3):
        with pytest.raises(ManifestMismatchError):
            OffloadEngine(other, path, config=OffloadConfig(policy="on_demand"))
    assert fds_on_store() == before

    class BrokenTier(PageCacheTier):
        def open(self, store):
            raise ConfigError("broken tier")

    started, real = [], engine_module.ProcessCopier
    monkeypatch.setattr(engine_module, "ProcessCopier", lambda *a, **kw: started.append(real(*a, **kw)) or started[-1])
    for copier in ("process", "thread"):  # fails after the copier started
        with pytest.raises(ConfigError, match="broken tier"):
            OffloadEngine(model, path, tier=BrokenTier(), config=OffloadConfig(policy="pregated", copier=copier))
    assert fds_on_store() == before and not _prefetch_threads()
    assert len(started) == 1 and started[0].proc.poll() is not None


def _save_lm(folder, seed, *, tokenizer=True):
    from lmlab.lm.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    build(pregated=True, vocab_size=len(tok), seed=seed, **SMALL).save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


def _cli(capsys, *args):
    from lmlab.cli import main

    capsys.readouterr()
    code = main(["moe", "generate", *map(str, args)])
    return code, capsys.readouterr()


def test_generate_rewrites_a_default_store_from_other_weights(tmp_path, capsys):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    def texts(folder, *extra):
        code, out = _cli(capsys, folder, "--prompt", "hello", "--max-new-tokens", "6", "--json",
                         "--policy", "on_demand", *extra)
        assert code == 0, out.err
        return json.loads(out.out)["texts"]

    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    a_texts = texts(_save_lm(stale, seed=0))  # writes stale/experts.safetensors from model A
    a_store = tmp_path / "a.safetensors"
    (stale / "experts.safetensors").rename(a_store)
    texts(stale)
    _save_lm(stale, seed=1)  # model B (same shape) saved over A: the default store is now A's
    want = texts(_save_lm(fresh, seed=1))
    assert want != a_texts and texts(stale) == want
    # an older store without a fingerprint is rewritten too
    with safe_open(str(a_store), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "fingerprint"}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(stale / "experts.safetensors"), metadata=meta)
    assert texts(stale) == want and ExpertStore(stale / "experts.safetensors").fingerprint is not None
    # an explicit --store from other weights is refused in one line, not used
    code, out = _cli(capsys, stale, "--prompt", "hello", "--store", a_store)
    assert code == 2 and "other expert weights" in out.err and len(out.err.strip().splitlines()) == 1


def test_generate_on_a_bad_model_folder_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    notok = _save_lm(tmp_path / "notok", seed=0, tokenizer=False)
    trunc = _save_lm(tmp_path / "trunc", seed=0)
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for folder, why in ((empty, "not a model folder"), (notok, "no tokenizer"), (trunc, "cannot load the weights")):
        code, out = _cli(capsys, folder, "--prompt", "hi")
        assert code == 2 and why in out.err, out.err
        assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err
