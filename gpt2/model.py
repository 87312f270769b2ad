"""GPT-2: the model, generation, Hugging Face weights in and out, and its optimizer.

The hot ops (attention, LayerNorm, GELU, lm_head + cross-entropy, AdamW) come from the op set that
gpt2/ops.py resolves from `GPTConfig.kernels`, once: a script that has resolved it already passes the
op set in (`GPT(config, ops)`). Nothing here knows which backend runs.

Each block is pre-norm: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). The residual add is carried
into the next LayerNorm (`add_layer_norm`), so that a fused kernel reads the stream once per sublayer.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2 import ops as ops_module
from gpt2.tokenizer import EOT_TOKEN, VOCAB_SIZE

HF_MODELS = {  # name -> (n_layer, n_head, n_embd); all have block_size 1024, vocab 50257
    "gpt2": (12, 12, 768),             # 124M
    "gpt2-medium": (24, 16, 1024),     # 350M
    "gpt2-large": (36, 20, 1280),      # 774M
    "gpt2-xl": (48, 25, 1600),         # 1558M
}
# HF stores these as Conv1D, weight (in, out); nn.Linear wants (out, in)
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT2Config settings that GPT-2 has and this model hard-codes: name -> GPT-2's value. A checkpoint that
# differs is refused, not loaded into a model that computes something else. (reorder_and_upcast_attn
# is not here: it only moves the attention scaling and upcasts it to fp32, the same math.)
HF_FIXED = {
    "tie_word_embeddings": True,            # one matrix for wte and lm_head
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,             # scores / sqrt(head size)
    "scale_attn_by_inverse_layer_idx": False,
}
HF_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's tanh approximation, under its two names


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304            # 50257 padded to a multiple of 128 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    kernels: str = "torch"             # see gpt2/ops.py
    real_vocab_size: int = VOCAB_SIZE  # ids at or above this are padding: never sampled, never exported

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        self.real_vocab_size = min(self.real_vocab_size, self.vocab_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_scale = True
        self.ops = ops

    def forward(self, x):
        # q, k, v side by side (B, T, 3C) in, the heads side by side (B, T, C) out: the Triton attention
        # writes d(qkv) as one tensor, where dq, dk, dv of separate heads would be concatenated
        y = self.ops.attention(self.c_attn(x), self.n_head)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_scale = True
        self.ops = ops

    def forward(self, x):
        return self.c_proj(self.ops.gelu(self.c_fc(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config, ops)
        self.ops = ops

    def forward(self, x, pending):
        """x: the residual stream; pending: the previous sublayer's output, not yet added to it."""
        x, h = add_layer_norm(self.ops, x, pending, self.ln_1)
        pending = self.attn(h)
        x, h = add_layer_norm(self.ops, x, pending, self.ln_2)
        return x, self.mlp(h)


def add_layer_norm(ops, x, delta, ln: nn.LayerNorm):
    """(x + delta, ln(x + delta)); delta None means there is nothing to add yet."""
    return ops.layernorm(x, delta, ln.weight, ln.bias, ln.eps)


def _check_head_size(config: GPTConfig, ops) -> None:
    """Found here, not at the first forward: a model the Triton attention cannot run."""
    if "attention" not in ops.on_triton:
        return
    from kernels.attention import HEAD_DIMS

    head_size = config.n_embd // config.n_head
    if head_size not in HEAD_DIMS:
        raise ops_module.KernelsError(
            f"head size {head_size} (n_embd {config.n_embd} / n_head {config.n_head}): the Triton attention takes "
            f"{', '.join(map(str, HEAD_DIMS))}; choose --n_embd and --n_head to match, or keep attention on "
            "PyTorch (--kernels torch, or a --kernels list without attention)")


class LoadError(RuntimeError):
    """GPT.from_pretrained could not read the weights (offline, or a damaged folder); the message says why."""


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, ops: ops_module.OpSet | None = None):
        """ops: the op set, when the caller has resolved config.kernels already (see gpt2/ops.py)."""
        super().__init__()
        self.ops = ops_module.resolve(ops if ops is not None else config.kernels)
        self.config = dataclasses.replace(config, kernels=self.ops.spec)  # what runs, as checkpoints record it
        _check_head_size(config, self.ops)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, self.ops) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale", False):  # two residual adds per layer
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, reduction="mean"):
        """idx (B, T) int64 -> (logits, loss).

        Without targets: logits (B, T, vocab_size) and loss None. With targets (B, T), -1 where a position
        is not scored: logits None -- the loss op (self.ops.cross_entropy) gets the final hidden states
        and the lm_head weight, and whether it ever forms the full logits is its business (PyTorch's does,
        the fused Triton op never does) -- and loss is
          reduction "mean": the mean cross-entropy over the positions whose target is not -1, over all
                            vocab_size logits (the training loss);
          reduction "none": (B, T) fp32 per-token losses, 0 where the target is -1, over the real vocabulary
                            only (config.real_vocab_size: padded ids are no tokens and get no probability),
                            for scoring (HellaSwag). Only the scored positions go through lm_head, except
                            under torch.compile, which keeps every position to keep the shapes static.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)        # (B, T, C)
        pending = None                                                   # sublayer output not yet added
        for block in self.transformer.h:
            x, pending = block(x, pending)
        _, x = add_layer_norm(self.ops, x, pending, self.transformer.ln_f)
        if targets is None:
            return self.lm_head(x), None                                 # (B, T, vocab_size)
        if reduction == "mean":
            return None, self.ops.cross_entropy(x, self.lm_head.weight, targets)
        if reduction == "none":
            return None, self._token_losses(x, targets)
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    def _token_losses(self, x, targets):
        """(B, T) fp32 cross-entropy of each position over the real vocabulary, 0 where targets is -1."""
        weight = self.lm_head.weight[: self.config.real_vocab_size]      # a view: (real_vocab, C)
        if torch.compiler.is_compiling():
            return self.ops.cross_entropy(x, weight, targets, reduction="none")
        scored = targets != -1                                           # (B, T); gathering syncs the host
        losses = torch.zeros(targets.shape, dtype=torch.float32, device=x.device)
        losses[scored] = self.ops.cross_entropy(x[scored], weight, targets[scored], reduction="none")
        return losses

    # -----------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, top_k=50, temperature=1.0, generator=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; top_k=1 or temperature=0 is greedy, and
        top_k None or <= 0 samples from every token (no top-k).

        The context is cropped to block_size; padded vocabulary ids are never produced. For a given
        torch.Generator (on idx's device) the result is deterministic.
        """
        if not 0 <= temperature < math.inf:  # a negative one would favour the least likely tokens
            raise ValueError(f"temperature must be 0 (greedy) or a positive number, got {temperature}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, : self.config.real_vocab_size].float()  # (B, real_vocab)
            if temperature == 0 or top_k == 1:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                # in float64, where any positive temperature is not 0, and the maximum subtracted first: with a
                # tiny temperature the quotients overflow to -inf (never drawn), not to inf - inf
                logits = (logits.double() - logits.amax(dim=-1, keepdim=True)) / temperature
                if top_k is not None and 0 < top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    # -----------------------------------------------------------------------------------------
    # Hugging Face weights

    @classmethod
    def from_pretrained(cls, name_or_dir: str, kernels: str | ops_module.OpSet = "torch") -> "GPT":
        """GPT-2 weights from the Hugging Face hub ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or a
        local directory written by `save_pretrained` (ours or transformers'). kernels: a --kernels
        value or a resolved op set."""
        # the op set first: importing transformers imports triton, and the Triton interpreter (no CUDA)
        # must be switched on before that (see gpt2/ops.py)
        ops = ops_module.resolve(kernels)
        from transformers import GPT2LMHeadModel

        # a hub name wins over a folder of the same name (this repository has a gpt2/ package)
        local = name_or_dir not in HF_MODELS and os.path.isdir(name_or_dir)
        if local:
            _check_local_folder(name_or_dir)
        elif name_or_dir not in HF_MODELS:
            raise ValueError(_not_a_model(name_or_dir))
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its table of missing keys: ours below says it in a line
        try:
            # the full hub id, so that transformers does not take a gpt2/ folder in the cwd for the model
            hf, loading = GPT2LMHeadModel.from_pretrained(name_or_dir if local else f"openai-community/{name_or_dir}",
                                                          output_loading_info=True, ignore_mismatched_sizes=True)
        except OSError as err:
            if local:
                raise LoadError(f"could not read the weights in {name_or_dir} ({_first_line(err)})") from None
            raise LoadError(
                f"could not load {name_or_dir!r} from the Hugging Face hub ({_first_line(err)}). "
                "Offline, pass a local directory written by save_pretrained instead of a hub name."
            ) from None
        except ValueError as err:  # transformers cannot build the model its config.json describes
            raise ValueError(f"{name_or_dir}: its config.json describes no model transformers can build "
                             f"({_first_line(err)})") from None
        except Exception as err:  # a damaged file: safetensors', torch's or pickle's own error
            raise LoadError(f"{name_or_dir}: its weights are damaged ({type(err).__name__}: {_first_line(err)}); "
                            "write them again with save_pretrained") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        _check_loading(loading, name_or_dir)
        hf_config = hf.config
        _check_hf_config(hf_config, name_or_dir)
        # real_vocab_size stays the GPT-2 BPE's 50257 (capped at vocab_size): rows past it are padding,
        # e.g. a save_pretrained of a model trained with vocab_size 50304 by another tool
        config = GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                           n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd)
        model = cls(config, ops)
        theirs = hf.state_dict()  # every tensor filled from the weights, in its config's shape (_check_loading)
        with torch.no_grad():
            for key, target in model.state_dict().items():
                target.copy_(theirs[key].t() if key.endswith(HF_TRANSPOSED) else theirs[key])
        return model

    def save_pretrained(self, directory: str) -> None:
        """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads with the same
        logits (the padded vocabulary rows cut away)."""
        from transformers import GPT2Config, GPT2LMHeadModel

        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"{directory} is a file: save_pretrained writes a folder")
        c = self.config
        eot = EOT_TOKEN if EOT_TOKEN < c.real_vocab_size else None
        hf_config = GPT2Config(vocab_size=c.real_vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                               n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                               tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot)
        hf = GPT2LMHeadModel(hf_config)
        theirs = hf.state_dict()
        with torch.no_grad():
            for key, source in self.state_dict().items():
                source = source.detach().float().cpu()
                if key.endswith(HF_TRANSPOSED):
                    source = source.t()
                if key in ("transformer.wte.weight", "lm_head.weight"):
                    source = source[: c.real_vocab_size]
                assert theirs[key].shape == source.shape, f"{key}: {tuple(source.shape)} vs HF {tuple(theirs[key].shape)}"
                theirs[key].copy_(source)
        hf.save_pretrained(directory)

    # -----------------------------------------------------------------------------------------
    # optimizer

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cuda", eps=1e-8):
        """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; biases and norms undecayed.

        The op set picks the class: torch.optim.AdamW (fused on CUDA) or our FusedAdamW.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer_cls = self.ops.adamw
        extra = {"fused": True} if optimizer_cls is torch.optim.AdamW and device_type == "cuda" else {}
        return optimizer_cls(groups, lr=learning_rate, betas=betas, eps=eps, **extra)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls of forward+backward plus 6*L*C*T for attention."""
        T = seq_len or self.config.block_size
        n = self.num_params(non_embedding=True)
        return 6 * n + 6 * self.config.n_layer * self.config.n_embd * T


def _not_a_model(name: str) -> str:
    """Why from_pretrained cannot take name, which is neither a hub name nor a folder."""
    if os.path.isfile(name):
        return (f"{name} is a file: from_pretrained takes a hub name or a folder written by save_pretrained "
                f"(a train.py checkpoint goes to sample.py and eval_hellaswag.py as --checkpoint)")
    parent = os.path.dirname(name)
    if name.startswith((".", os.sep, "~")) or (parent and os.path.isdir(parent)):
        return f"no folder {name}"
    return (f"unknown model {name!r}: use one of {', '.join(HF_MODELS)} (hub names without their "
            "openai-community/ prefix) or a local directory written by save_pretrained")


def _check_local_folder(folder: str) -> None:
    """ValueError for a folder that holds no GPT-2 model: no config.json, or another model's."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} holds no config.json: it is not a directory written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type", "gpt2")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable config ({err})") from None
    if model_type != "gpt2":
        raise ValueError(f"{folder} holds a {model_type!r} model (config.json's model_type); this loads GPT-2 only")


def _check_loading(loading: dict, name: str) -> None:
    """ValueError when the weights and config.json disagree: transformers fills a missing or misshapen
    tensor with random values, and drops one the config has no place for, and carries on."""
    def tensors(kind):  # the attention mask buffers that older transformers saved are no weights
        return sorted(key for key in loading[kind] if not key.endswith((".attn.bias", ".attn.masked_bias")))

    for kind, what in (("missing_keys", "lack {} tensors that its config.json's model has"),
                       ("unexpected_keys", "hold {} tensors that its config.json's model has no place for")):
        keys = tensors(kind)
        if keys:
            raise ValueError(f"{name}: the weights {what.format(len(keys))} ({', '.join(keys[:3])}"
                             f"{', ...' if len(keys) > 3 else ''}): the directory is inconsistent")
    if loading["mismatched_keys"]:
        key, weights_shape, config_shape = sorted(loading["mismatched_keys"])[0]
        raise ValueError(f"{name}: {key} is {tuple(weights_shape)} in the weights but {tuple(config_shape)} by "
                         f"its config.json ({len(loading['mismatched_keys'])} tensors differ): the directory is "
                         "inconsistent")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _check_hf_config(hf_config, name: str) -> None:
    """ValueError, naming the setting, for a Hugging Face GPT-2 config this model cannot represent."""
    activation = getattr(hf_config, "activation_function", "gelu_new")
    if activation not in HF_GELUS:
        raise ValueError(f"{name}: activation_function={activation!r} is not supported: this model has GPT-2's "
                         f"tanh GELU ({' or '.join(HF_GELUS)})")
    n_inner = getattr(hf_config, "n_inner", None)  # None means 4 * n_embd
    if n_inner not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"{name}: n_inner={n_inner} is not supported: this model's MLP is 4 * n_embd = "
                         f"{4 * hf_config.n_embd} wide")
    for setting, gpt2_value in HF_FIXED.items():
        value = getattr(hf_config, setting, gpt2_value)
        if value != gpt2_value:
            raise ValueError(f"{name}: {setting}={value!r} is not supported: this model hard-codes GPT-2's "
                             f"{setting}={gpt2_value!r}")
