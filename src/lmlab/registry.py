"""Every technique of the August 2023 roundup, and how far lmlab has taken it.

This table is the single source of truth for ``lmlab ls`` and for README's technique table
(``lmlab ls --markdown``; ``tests/test_registry.py`` fails when README and this file differ).
A row's ``status`` must stay true:

- ``planned``: nothing usable yet;
- ``partial``: some of the component exists (the ``note`` says what), the claim is not reproduced;
- ``works``: the component, its CLI and tests exist, and its recipe has written ``results/<recipe>.json``;
- ``survey``: a survey or position paper; nothing to implement, listed for completeness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

STATUSES = ("planned", "partial", "works", "survey")


@dataclass(frozen=True)
class Technique:
    key: str  # short id used on the command line (`lmlab ls --family ...`) and in results names
    title: str  # the paper's title
    arxiv: str  # arXiv id
    family: str  # lmlab sub-package that owns it (see shared/DESIGN.md)
    module: str  # where the implementation lives (or will live)
    cli: str  # the command a user runs
    recipe: str  # the reproduction script under recipes/ ("" when there is none)
    status: str  # one of STATUSES
    note: str = ""  # what exists / what is missing, one line

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"{self.key}: status {self.status!r} not in {STATUSES}")

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


def _t(key, title, arxiv, family, module, cli, recipe, status, note=""):
    return Technique(key, title, arxiv, family, module, cli, recipe, status, note)


TECHNIQUES: tuple[Technique, ...] = (
    _t("silo", "SILO Language Models: Isolating Legal Risk In a Nonparametric Datastore", "2308.04430",
       "silo", "lmlab.silo", "lmlab silo pipeline", "recipes/silo.py", "works",
       "datastore (faiss, shards, resume, opt-out), kNN-LM, RIC-LM, attribution, server, `make demo`; kNN-LM "
       "lowers restricted test perplexity 30±11% (3 seeds) vs 7±8% for the all-data reference LM (466% of the "
       "gap), RIC-LM -1%; kNN-LM eval over 1.05M IVF-PQ entries "
       "at k=1024: 1.09x parametric with SmolLM2-135M (target 1.5x), 3.0x for the demo's 2M-param LM"),
    _t("soft-moe", "From Sparse to Soft Mixtures of Experts", "2308.00951",
       "moe", "lmlab.moe.soft_moe", "lmlab moe train --mlp soft", "recipes/soft_moe.py", "works",
       "Soft MoE, token- and expert-choice layers in a ViT; claim not reproduced on Fashion-MNIST; "
       "Soft MoE fwd+bwd 1.29-1.36x dense at batch 16 over runs on three days (median within-round ratio; "
       "target 1.3x; its expert bank alone 1.08-1.13x), 1.22-1.27x at batch 32 and 64; H100 (B=64, T=256, "
       "D=512, E=16) 1.24x"),
    _t("gist", "GIST: Generating Image-Specific Text for Fine-grained Object Classification", "2307.11315",
       "vision", "lmlab.vision.gist", "", "", "planned",
       "needs a vision-language model; no CLIP weights are installable offline here"),
    _t("umm", "Universal Majorization-Minimization Algorithms", "2308.00190",
       "optim", "lmlab.optim.umm", "", "", "planned"),
    _t("rlhf-problems", "Open Problems and Fundamental Limitations of Reinforcement Learning from Human Feedback",
       "2307.15217", "survey", "", "", "", "survey"),
    _t("skill-it", "Skill-it! A Data-Driven Skills Framework for Understanding and Training Language Models",
       "2307.14430", "curate", "lmlab.curate.skill_it", "lmlab curate skill-it", "recipes/skill_it.py", "planned"),
    _t("tool-docs", "Tool Documentation Enables Zero-Shot Tool-Usage with Large Language Models", "2308.00675",
       "tools", "lmlab.tools.prompting", "lmlab tools prompt", "recipes/tool_docs.py", "works",
       "cloud-CLI benchmark from the gcloud man pages; zero/few-shot x no-docs/docs grid with SmolLM2-135M and "
       "Gemma-3-270M: docs beat demos on the command path (docs@1 .43/.27 vs .03), not on flags; more "
       "candidate tools hurt"),
    _t("toolllm", "ToolLLM: Facilitating Large Language Models to Master 16000+ Real-world APIs", "2307.16789",
       "tools", "lmlab.tools.retrieve", "lmlab tools retrieve", "recipes/tool_retrieval.py", "works",
       "API retriever: BM25, MiniLM + faiss, MNR fine-tuning (120 steps chosen on val; test NDCG@1 .688 vs "
       "BM25 .552, untuned .516)"),
    _t("rt-2", "RT-2: Vision-Language-Action Models Transfer Web Knowledge to Robotic Control", "2307.15818",
       "robotics", "", "", "", "planned", "needs robot data and a VLM; out of scope on this machine"),
    _t("stop", "Stochastic positional embeddings improve masked image modeling", "2308.00566",
       "vision", "lmlab.vision.stop", "", "", "planned"),
    _t("matrix-completion", "Matrix Completion in Almost-Verification Time", "2308.03661",
       "optim", "lmlab.optim.matrix_completion", "", "", "planned"),
    _t("on-device-nlu", "Intelligent Assistant Language Understanding On Device", "2308.03905",
       "survey", "", "", "", "survey", "a systems design report; no reproducible claim"),
    _t("rewarm", "Continual Pre-Training of Large Language Models: How to (re)warm your model?", "2308.04014",
       "lm", "lmlab.lm.schedules", "lmlab lm train --schedule rewarm", "recipes/rewarm.py", "partial",
       "re-warm schedule and resumable Trainer exist; the recipe does not yet"),
    _t("ewa", "Experts Weights Averaging: A New General Training Scheme for Vision Transformers", "2308.06093",
       "moe", "lmlab.moe.ewa", "lmlab moe train --ewa", "recipes/ewa.py", "works",
       "random-partition MoE, EWA update, collapse to a dense ViT; gain within seed noise on Fashion-MNIST"),
    _t("pregated-moe", "Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert "
       "Inference", "2308.12066", "moe", "lmlab.moe.offload", "lmlab moe generate", "recipes/pregated.py", "works",
       "pre-gated MoE LM + offloaded engine (one-pass prefill, mixed-length batches, a copy process for CPU "
       "prefetches, each expert run as it arrives); emulated PCIe-like link: 1.12-1.21x resident latency "
       "(target 1.25x), 1.6x faster than on-demand at 2x active-expert memory; H100 (cuda tier, launch-bound "
       "eager decode): 1.15-1.46x resident with 33.6 MB experts, 1.14-1.15x with 8.4 MB, not faster than "
       "on-demand"),
    _t("eve", "EVE: Efficient Vision-Language Pre-training with Masked Prediction and Modality-Aware MoE",
       "2308.11971", "moe", "lmlab.moe.modality_moe", "", "", "planned"),
    _t("curriculum-adam", "Curriculum Learning with Adam: The Devil Is in the Wrong Details", "2308.12202",
       "curate", "lmlab.curate.curriculum", "", "", "planned"),
    _t("adam-divergence", "Divergence of the ADAM algorithm with fixed-stepsize: a (very) simple example",
       "2308.00720", "optim", "lmlab.optim.adam_divergence", "", "", "planned"),
    _t("efficient-benchmarking", "Efficient Benchmarking (of Language Models)", "2308.11696",
       "evals", "lmlab.evals.dior", "lmlab evals dior", "recipes/efficient_benchmarking.py", "planned"),
    _t("got", "Graph of Thoughts: Solving Elaborate Problems with Large Language Models", "2308.09687",
       "reason", "lmlab.reason.got", "lmlab reason got", "recipes/got.py", "planned"),
    _t("actadd", "Activation Addition: Steering Language Models Without Optimization", "2308.10248",
       "steer", "lmlab.steer.actadd", "lmlab steer actadd", "recipes/actadd.py", "planned"),
    _t("instruction-tuning-survey", "Instruction Tuning for Large Language Models: A Survey", "2308.10792",
       "survey", "", "", "", "survey"),
    _t("mcq-order", "Large Language Models Sensitivity to The Order of Options in Multiple-Choice Questions",
       "2308.11483", "evals", "lmlab.evals.option_order", "lmlab evals option-order", "recipes/mcq_order.py",
       "planned"),
    _t("d4", "D4: Improving LLM Pretraining via Document De-Duplication and Diversification", "2308.12284",
       "curate", "lmlab.curate.d4", "lmlab curate d4", "recipes/d4.py", "planned"),
)


def get(key: str) -> Technique:
    for t in TECHNIQUES:
        if t.key == key:
            return t
    from lmlab.errors import ConfigError

    raise ConfigError(f"unknown technique {key!r}; `lmlab ls` lists them")


def as_rows() -> list[dict]:
    return [asdict(t) for t in TECHNIQUES]


def markdown_table() -> str:
    """README's technique table, exactly as `lmlab ls --markdown` prints it."""
    lines = [
        "| technique | paper | module | command | recipe | status |",
        "|---|---|---|---|---|---|",
    ]
    for t in TECHNIQUES:
        mod = f"`{t.module}`" if t.module else "-"
        cli = f"`{t.cli}`" if t.cli else "-"
        recipe = f"`{t.recipe}`" if t.recipe else "-"
        status = t.status + (f" ({t.note})" if t.note else "")
        lines.append(f"| {t.key} | [{t.title}]({t.url}) | {mod} | {cli} | {recipe} | {status} |")
    return "\n".join(lines) + "\n"
