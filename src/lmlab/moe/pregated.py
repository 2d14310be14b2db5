"""Pre-gated MoE: a decoder-only MoE language model whose block i gate picks block i+1's experts.

Paper: Hwang et al. 2023, "Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable
Mixture-of-Expert Inference", arXiv 2308.12066 (ISCA 2024). Official artifact: ranggihwang/Pregated_MoE
(a FasterTransformer fork; inference only, no training code for the pre-gate).

Shapes: B batch, T tokens, D width, H expert hidden width, E experts, k experts per token, V vocab, L blocks.

What is implemented:
- :class:`PreGatedMoEForCausalLM`: Llama-style blocks (RMSNorm, rotary attention, residuals) whose FFN is a
  top-k token-choice MoE over the issue-5 expert bank (:class:`lmlab.moe.experts.Experts`, one batched matmul,
  routed with :func:`lmlab.moe.token_choice.top_k_routing` and :func:`~lmlab.moe.token_choice.dispatch_combine`).
  Two variants share everything but where routing comes from (``config.pregated``):
  * conventional: block i's router reads block i's MoE input and picks block i's experts;
  * pre-gated (the paper's pre-gate function): block i's *pre-gate* reads block i's MoE input and picks block i+1's
    experts; block 0 keeps its own router as well (it has no predecessor); the last block has no pre-gate
    (its pre-gate would be unused, so we do not create dead parameters). The pre-gate is trained end to end
    with the rest of the model (the paper trains its pre-gates with the model; it fine-tunes pretrained Switch
    Transformers, we train from scratch).
- Switch load-balancing loss (Switch Transformer Eq. 4, :func:`lmlab.moe.losses.switch_balance_loss`) on every
  gate, returned as ``output.aux_loss`` and, when training, folded into the gradient of the logits with an
  identity autograd function (Megatron-LM's ``MoEAuxLossAutoScaler`` trick), so :class:`lmlab.lm.train.Trainer`
  (which only differentiates cross-entropy of ``.logits``) trains the balance term too. Given ``labels=``, the
  balance term is added to ``output.loss`` instead and not folded into the logits (its gradient counts once).
  With ``grad_accum > 1`` the Trainer divides the LM loss by grad_accum but the folded balance term is not
  divided (its weight is effectively ``router_aux_loss_coef * grad_accum``); the recipe uses grad_accum = 1.
- :func:`routing_from_logits` and the per-block pieces (:meth:`PreGatedBlock.attend`, ``router``/``pregate``)
  that the offloaded engine (:mod:`lmlab.moe.offload`) calls to run the same model block by block.

Section/figure numbers of the paper are not cited: its text was not available offline while this was written;
the design follows the paper's abstract and the issue. Deviations: the paper pre-gates Switch Transformers
(encoder-decoder, top-1) and evaluates downstream tasks; we train small decoder-only LMs from scratch with top-k
routing (k=2 by default, Mixtral-style renormalised gates), no capacity limit (no token is dropped, so a
sequence's routing never depends on the other sequences of the batch), and GELU two-layer experts (the issue-5
bank; Switch uses ReLU, Llama SwiGLU). As in the issue, block 0 keeps its own router.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from lmlab.errors import ConfigError
from lmlab.moe.experts import Experts
from lmlab.moe.losses import switch_balance_loss
from lmlab.moe.token_choice import TokenChoiceRouting, dispatch_combine, top_k_routing

MODEL_TYPE = "lmlab_pregated_moe"


class PreGatedMoEConfig(PretrainedConfig):
    """Hugging Face config of :class:`PreGatedMoEForCausalLM` (a ``PretrainedConfig`` so that
    ``save_pretrained``/``from_pretrained`` and the Trainer work; every field has a commented default)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 259,  # byte tokenizer (256 bytes + specials); set from the tokenizer
                 hidden_size: int = 128,  # D
                 num_hidden_layers: int = 4,  # L
                 num_attention_heads: int = 4,
                 expert_hidden_size: int = 512,  # H = 4 D, the Transformer/Switch ratio
                 num_experts: int = 8,  # E (Switch-Base-8 is the paper's smallest model)
                 num_experts_per_tok: int = 2,  # k (Switch: 1; Mixtral: 2)
                 renormalize_gates: bool = True,  # Mixtral: gates renormalised over the k choices
                 pregated: bool = True,  # False: the conventional MoE of the same size
                 router_aux_loss_coef: float = 0.01,  # Switch alpha = 1e-2
                 max_position_embeddings: int = 512,
                 rope_theta: float = 10000.0,  # Llama
                 rms_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02,  # Llama / GPT-2
                 tie_word_embeddings: bool = False,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.expert_hidden_size = expert_hidden_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.renormalize_gates = renormalize_gates
        self.pregated = pregated
        self.router_aux_loss_coef = router_aux_loss_coef
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("the head width must be even for rotary embeddings")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                              f"got {self.num_experts_per_tok}")
        if self.num_hidden_layers < 1:
            raise ConfigError("num_hidden_layers must be >= 1")


def routing_from_logits(logits: Tensor, *, k: int, renormalize: bool) -> TokenChoiceRouting:
    """Top-k routing of (B, T, E) gate logits with no capacity limit (every assignment is kept).

    Uses the issue-5 router (:func:`top_k_routing`), then shrinks the expert buffer to the largest number of
    tokens any expert actually received, so :func:`dispatch_combine` does not compute E x T empty rows.
    """
    r = top_k_routing(logits, k=k, capacity=logits.shape[1], renormalize=renormalize)
    used = int(r.position.max()) + 1 if r.position.numel() else 1
    return dataclasses.replace(r, capacity=used)


class _AuxLossInGradient(torch.autograd.Function):
    """Identity on ``logits`` whose backward also sends gradient 1 to ``aux_loss`` (Megatron's
    MoEAuxLossAutoScaler): lets a loop that only differentiates the LM loss train the balance loss too."""

    @staticmethod
    def forward(ctx, logits: Tensor, aux_loss: Tensor) -> Tensor:
        ctx.save_for_backward(aux_loss)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotary(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim) for the given positions (RoFormer Eq. 34, Llama's half-split layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x by the angles' cos/sin, cast to x's dtype: in a bf16/fp16 model, float32 cos/sin would promote q
    and k to float32 while v stays half, and attention refuses mixed dtypes (a no-op in fp32)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Pre-allocated keys/values of one block: (B, heads, max_len, head_dim) each, written in place."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, *, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)


class Attention(nn.Module):
    def __init__(self, config: PreGatedMoEConfig):
        super().__init__()
        d, self.heads = config.hidden_size, config.num_attention_heads
        self.head_dim = d // self.heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, *, cache: KVCache | None = None, start: int = 0,
                real: Tensor | None = None) -> Tensor:
        """``real`` (B, >= start + t) bool, with the KV cache only: which positions hold real tokens (left
        padding). A query attends causally to real positions, and a padding query to itself alone (so its row of
        the softmax is never empty). cos/sin are (t, head_dim), or per row (B, 1, t, head_dim)."""
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            if t > 1 and start > 0:
                raise ValueError("the KV cache takes a prompt at start=0 or one token at a time")
            cache.k[:, :, start:start + t] = k
            cache.v[:, :, start:start + t] = v
            k, v = cache.k[:, :, :start + t], cache.v[:, :, :start + t]
        mask = None
        if real is not None:
            n = k.shape[2]
            qpos = torch.arange(start, start + t, device=x.device)[:, None]
            kpos = torch.arange(n, device=x.device)[None, :]
            mask = ((kpos <= qpos) & (real[:, None, :n] | (kpos == qpos)))[:, None]  # (B, 1, t, n)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t > 1 and mask is None)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, d))


class PreGatedBlock(nn.Module):
    """One decoder block. ``router`` picks this block's experts (every block in the conventional model; block 0
    only in the pre-gated one); ``pregate`` picks the next block's experts (pre-gated model, blocks 0..L-2)."""

    def __init__(self, config: PreGatedMoEConfig, index: int):
        super().__init__()
        d, e = config.hidden_size, config.num_experts
        self.index = index
        self.attn_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(d, eps=config.rms_norm_eps)
        has_router = not config.pregated or index == 0
        has_pregate = config.pregated and index < config.num_hidden_layers - 1
        self.router = nn.Linear(d, e, bias=False) if has_router else None
        self.pregate = nn.Linear(d, e, bias=False) if has_pregate else None  # the pre-gate: selects block i+1's experts
        self.experts = Experts(e, dim=d, hidden=config.expert_hidden_size, activation="gelu")

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor, *, cache: KVCache | None = None, start: int = 0,
               real: Tensor | None = None) -> Tensor:
        """x + attention(norm(x)): the block up to its MoE input."""
        return x + self.attn(self.attn_norm(x), cos, sin, cache=cache, start=start, real=real)


class PreGatedMoEForCausalLM(PreTrainedModel):
    """Decoder-only MoE LM, conventional or pre-gated (``config.pregated``); see the module docstring.

    ``model(input_ids=ids).logits`` is (B, T, V); ``.aux_loss`` the summed balance losses (already weighted);
    ``.router_logits`` the tuple of each block's gate logits (B, T, E), in the order blocks use them.
    """

    config_class = PreGatedMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["PreGatedBlock"]

    def __init__(self, config: PreGatedMoEConfig):
        super().__init__(config)
        config.check()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PreGatedBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Experts):
            module.reset_parameters()  # nn.Linear-style init per expert (issue-5 bank)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def route(self, logits: Tensor) -> TokenChoiceRouting:
        return routing_from_logits(logits, k=self.config.num_experts_per_tok,
                                   renormalize=self.config.renormalize_gates)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, **kwargs) -> MoeCausalLMOutputWithPast:
        """Full-sequence forward (training, scoring). ``attention_mask`` is accepted for API compatibility; padding
        is not supported (pass unpadded rows). ``labels`` are HF-style (shifted inside)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ConfigError("PreGatedMoEForCausalLM does not support padded batches; pass unpadded rows")
        b, t = input_ids.shape
        if t > self.config.max_position_embeddings:
            raise ConfigError(f"{t} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        x = self.embed_tokens(input_ids)
        cos, sin = rotary(torch.arange(t, device=x.device), self.head_dim, self.config.rope_theta)
        aux = x.new_zeros(())
        used_logits: list[Tensor] = []
        next_logits: Tensor | None = None  # pre-gated: block i's pre-gate output, used by block i+1
        for blk in self.layers:
            x = blk.attend(x, cos, sin)
            u = blk.mlp_norm(x)
            gate_logits = blk.router(u) if blk.router is not None else next_logits  # (B, T, E)
            next_logits = blk.pregate(u) if blk.pregate is not None else None  # pre-gate: block i+1's experts
            routing = self.route(gate_logits)
            x = x + dispatch_combine(u, routing, blk.experts)
            aux = aux + switch_balance_loss(routing.router_probs, routing.expert_index)  # Switch Eq. 4
            used_logits.append(gate_logits)
        aux = self.config.router_aux_loss_coef * aux
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:  # HF-style: ``loss`` carries the balance term itself, so it is not folded as well
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100) + aux
        elif self.training and torch.is_grad_enabled() and aux.requires_grad:
            logits = _AuxLossInGradient.apply(logits, aux)  # the Trainer only differentiates CE(logits)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, router_logits=tuple(used_logits))

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (w1, b1, w2, b2)."""
        ex = self.layers[0].experts
        n = sum(p[0].numel() for p in (ex.w1, ex.b1, ex.w2, ex.b2) if p is not None)
        return n * ex.w1.element_size()

    def num_active_parameters(self) -> int:
        """Parameters used per token: everything but the E - k unused experts of each block."""
        total = sum(p.numel() for p in self.parameters())
        c = self.config
        per_expert = self.expert_bytes() // self.layers[0].experts.w1.element_size()
        return total - c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * per_expert


def build(*, pregated: bool, vocab_size: int, seed: int = 0, **overrides) -> PreGatedMoEForCausalLM:
    """A randomly initialised model (fixed seed); ``overrides`` are :class:`PreGatedMoEConfig` fields."""
    torch.manual_seed(seed)
    return PreGatedMoEForCausalLM(PreGatedMoEConfig(vocab_size=vocab_size, pregated=pregated, **overrides)).eval()


def _register_auto() -> None:
    """Let ``AutoModelForCausalLM.from_pretrained(folder)`` (and ``lmlab.lm.models.load(folder)``) open our folders."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, PreGatedMoEConfig)
        AutoModelForCausalLM.register(PreGatedMoEConfig, PreGatedMoEForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto()

__all__ = ["KVCache", "PreGatedBlock", "PreGatedMoEConfig", "PreGatedMoEForCausalLM", "build", "rotary",
           "routing_from_logits"]
