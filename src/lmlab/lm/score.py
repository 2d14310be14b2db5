"""Token log-likelihoods and sliding-window perplexity for any Hugging Face causal LM.

- :func:`token_logprobs`: log p(x_t | x_<t) for every position of a (padded) batch.
- :func:`sliding_windows`: the strided evaluation windows of Hugging Face's "Perplexity of fixed-length
  models" guide, as SILO's code builds them (``batch_merged`` in kernelmachine/silo-lm ``scripts/model.py``).
- :func:`iter_window_logprobs`: one batched forward per ``batch_size`` windows, yielding each window's
  full-vocabulary log-probabilities (and optionally last-layer hidden states) at its scored positions,
  which SILO's kNN-LM (Min et al. 2023, arXiv 2308.04430; after Khandelwal et al. 2020) interpolates with p_kNN.
- :func:`perplexity` / :func:`perplexity_of_texts`: built on it; per-token NLL aligned to positions 1..N-1.

Windows (see :class:`Window`): the model reads at most ``window`` tokens ``ids[begin:end-1]`` and its logit at
each of them predicts the next token, so a window's *span* ``ids[begin:end]`` is at most ``window + 1`` tokens
and a target always has at least one token of context. Windows start every ``stride`` tokens; each scores only
the targets no earlier window scored, so every token from position 1 is scored exactly once, with between
``window - stride + 1`` and ``window`` tokens of context (the first window: 1 to ``window``). This is exactly
SILO's ``batch_merged`` (input ``ids[b:e]``, targets ``ids[b+1:e+1]``, the last ``e - prev_e`` scored).
Deviation from the Hugging Face guide's loop: that loop feeds ``window`` tokens and scores at most
``window - 1`` of them, so with ``stride == window`` it never scores the first token of each later window;
here ``stride == window`` is the usual non-overlapping evaluation (inputs ``ids[kW:(k+1)W]``, targets shifted
by one), covering every token.

Shape legend: B batch, T tokens, V vocab, D hidden width, b windows in a batch, k kept positions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmlab.errors import ConfigError, DataError

# SILO's evaluation setting: max_seq_length 1024, stride 512, batch size 8 (silo-lm scripts/main.py defaults).
DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class Window:
    """One evaluation window over a token sequence ``ids``.

    The model reads ``ids[begin:end-1]`` (:attr:`inputs`, at most ``window`` tokens) and the window scores the
    targets ``ids[score_from:end]`` (:attr:`targets`), each from the logit one position before it.
    """

    begin: int  # first token the model reads
    end: int  # one past the window's last target; the model reads up to end - 1 (exclusive)
    score_from: int  # first target this window scores (begin < score_from < end)

    @property
    def inputs(self) -> slice:
        return slice(self.begin, self.end - 1)

    @property
    def targets(self) -> slice:
        return slice(self.score_from, self.end)

    @property
    def n_inputs(self) -> int:
        return self.end - 1 - self.begin

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


@dataclass
class WindowLogprobs:
    """What :func:`iter_window_logprobs` yields for one window (all rows align with ``target_ids``)."""

    window: Window
    target_ids: torch.Tensor  # (n_scored,) = ids[window.targets]
    logprobs: torch.Tensor | None  # (n_scored, V) float32 log-softmax predicting target_ids (None: logprobs=False)
    hidden_states: torch.Tensor | None  # (n_scored, D) last-layer states that produced those logits, or None


@dataclass
class PerplexityResult:
    nll: float  # total negative log-likelihood of the scored tokens, in nats
    n_tokens: int  # number of scored tokens (N - 1 for N input tokens)
    ppl: float  # exp(nll / n_tokens)
    token_nll: torch.Tensor  # (N - 1,) float32; token_nll[t - 1] = -log p(x_t | window context), t = 1..N-1


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _as_1d_ids(input_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise DataError(f"perplexity needs one token sequence (1-D ids); got shape {tuple(ids.shape)}")
    if ids.numel() < 2:
        raise DataError(f"perplexity needs at least 2 tokens (the first is never scored); got {ids.numel()}")
    return ids.to(device)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model.eval()`` (no dropout), then restore each module's own ``training`` flag.

    Scores must not depend on dropout: a model fresh from :class:`~lmlab.lm.train.Trainer` (or any model a user
    left in ``train()`` mode) would otherwise give a different perplexity on every call.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _check_window(model: torch.nn.Module, window: int) -> None:
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and window > max_pos:
        raise ConfigError(f"window {window} exceeds the model's max_position_embeddings ({max_pos}): "
                          f"pass window <= {max_pos}")


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, *,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1, as a (B, T-1) float32 tensor (no gradients).

    With ``attention_mask`` (B, T), positions are numbered from each row's first real token (so left padding
    gives the same numbers as no padding), and a target that is padding or whose previous token is padding
    gets 0.0, so ``.sum(-1)`` is each row's log-likelihood from its second real token on.
    """
    if input_ids.dim() != 2:
        raise DataError(f"token_logprobs needs a (batch, tokens) tensor; got shape {tuple(input_ids.shape)}")
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), eval_mode(model):
        logits = model(input_ids, **kwargs).logits[:, :-1]  # (B, T-1, V)
        targets = input_ids[:, 1:]
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for row in range(logits.shape[0]):  # one row at a time bounds the float32 copy at (T-1, V)
            logprobs = torch.log_softmax(logits[row].float(), dim=-1)
            out[row] = logprobs.gather(-1, targets[row, :, None]).squeeze(-1)
    if attention_mask is not None:
        valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        out = out.masked_fill(~valid, 0.0)
    return out


def sliding_windows(n_tokens: int, *, window: int, stride: int) -> list[Window]:
    """The evaluation windows over ``n_tokens`` tokens (see the module docstring).

    Window k starts at ``k * stride``; the model reads at most ``window`` tokens; the first window scores
    positions 1.. and each later one the ``end - prev_end`` targets after the previous window's last
    (SILO ``batch_merged``'s ``trg_len``). Every position 1..n_tokens-1 is scored by exactly one window.
    """
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens; got {window}")
    if not 0 < stride <= window:
        raise ConfigError(f"stride must satisfy 0 < stride <= window ({window}); got {stride}")
    windows: list[Window] = []
    prev_end = 1  # position 0 is never a target: nothing precedes it
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + window + 1, n_tokens)
        windows.append(Window(begin=begin, end=end, score_from=prev_end))
        prev_end = end
        begin += stride
    return windows


def iter_window_logprobs(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int], *,
                         window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
                         batch_size: int = DEFAULT_BATCH_SIZE, output_hidden_states: bool = False,
                         logprobs: bool = True, progress: bool = False) -> Iterator[WindowLogprobs]:
    """Yield :class:`WindowLogprobs` for every window of ``input_ids`` in order, one forward per batch.

    Windows are taken ``batch_size`` at a time; all but the last window read exactly ``window`` tokens, and
    a shorter last one is right-padded, as SILO does (a causal model's outputs at real positions never
    depend on later tokens, so the padding needs no attention mask).
    Logits are computed only for the positions some window in the batch scores (``logits_to_keep`` where the
    model supports it) and log-softmaxed in float32. ``output_hidden_states`` adds ``hidden_states[-1]``
    (for HF Llama: after the final norm, the vector the LM head reads; kNN-LM's key/query).
    ``logprobs=False`` skips the LM head and the softmax (``logits_to_keep=1``) and yields ``logprobs=None``: for
    callers that only need hidden states or hooked activations (a datastore build; the head of a 49k-token
    vocabulary is a fifth of SmolLM2-135M's forward).
    Yielded tensors are views into the batch's tensors and carry no gradients. Peak memory is about
    2 x batch_size x kept positions x V floats (logits and log-probabilities): lower batch_size for big vocabularies.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1; got {batch_size}")
    _check_window(model, window)
    ids = _as_1d_ids(input_ids, _model_device(model))
    windows = sliding_windows(len(ids), window=window, stride=stride)
    # Only models that declare logits_to_keep get it (HF causal LMs do); the logits are sliced to the kept suffix
    # either way, so a model without it just computes a few unneeded logits.
    keep_supported = "logits_to_keep" in inspect.signature(model.forward).parameters
    with tqdm(total=len(windows), disable=not progress, desc="perplexity", unit="window") as bar:
        for start in range(0, len(windows), batch_size):
            group = windows[start:start + batch_size]
            length = max(w.n_inputs for w in group)
            # Keep the suffix of positions that covers every row's scored logits: a window's targets are its
            # last n_scored inputs shifted by one, so row i needs positions [score_from - 1 - begin, n_inputs).
            first = min(w.score_from - 1 - w.begin for w in group)
            keep = length - first
            x = torch.stack([F.pad(ids[w.inputs], (0, length - w.n_inputs)) for w in group])  # (b, length)
            kwargs: dict = {}
            if keep_supported:
                kwargs["logits_to_keep"] = keep if logprobs else 1
            if output_hidden_states:
                kwargs["output_hidden_states"] = True
            with torch.no_grad(), eval_mode(model):  # not around the yields: the caller runs between them
                out = model(x, **kwargs)
                lps = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1) if logprobs else None  # (b, k, V)
            hidden = out.hidden_states[-1][:, -keep:] if output_hidden_states else None  # (b, k, D)
            for row, w in enumerate(group):
                lo = w.score_from - 1 - w.begin - first
                rows = slice(lo, lo + w.n_scored)
                yield WindowLogprobs(window=w, target_ids=ids[w.targets],
                                     logprobs=None if lps is None else lps[row, rows],
                                     hidden_states=None if hidden is None else hidden[row, rows])
            bar.update(len(group))


def perplexity(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int], *,
               window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, batch_size: int = DEFAULT_BATCH_SIZE,
               progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of one token sequence (N >= 2 ids, 1-D or (1, N)); scores positions 1..N-1 once.

    Defaults (window 1024, stride 512, batch 8) are SILO's evaluation setting (silo-lm ``scripts/main.py``).
    ``window`` may not exceed the model's ``max_position_embeddings``.
    """
    ids = _as_1d_ids(input_ids, _model_device(model))
    token_nll = torch.empty(len(ids) - 1, dtype=torch.float32, device=ids.device)
    for wl in iter_window_logprobs(model, ids, window=window, stride=stride, batch_size=batch_size,
                                   progress=progress):
        target_lp = wl.logprobs.gather(-1, wl.target_ids[:, None]).squeeze(-1)
        token_nll[wl.window.score_from - 1:wl.window.end - 1] = -target_lp  # position t -> index t - 1
    nll = token_nll.double().sum().item()
    n = token_nll.numel()
    return PerplexityResult(nll=nll, n_tokens=n, ppl=math.exp(nll / n), token_nll=token_nll)


def perplexity_of_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], **kw) -> PerplexityResult:
    """Perplexity of documents concatenated into one stream, separated by the tokenizer's EOS token.

    Each text is tokenized without special tokens; an EOS goes *between* consecutive documents (and is scored
    like any other token), so a window may see the end of the previous document as context. SILO's ``merge``
    evaluation also scores one concatenated stream, but without a separator. The first token of the first
    document is not scored. ``kw`` goes to :func:`perplexity`.
    """
    if not texts:
        raise DataError("perplexity_of_texts needs at least one text")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token to separate documents with")
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return perplexity(model, ids, **kw)
