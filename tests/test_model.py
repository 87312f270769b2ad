"""The model against independent references: hand-written float64 math, and Hugging Face's GPT-2."""
import json
import math
import pathlib

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2 import GPT, GPTConfig
from gpt2.model import HF_TRANSPOSED, LoadError
from gpt2.ops import KernelsError

TINY = dict(block_size=32, vocab_size=128, n_layer=2, n_head=3, n_embd=48, real_vocab_size=100)


def reference_logits(state: dict, config: GPTConfig, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward pass written out in float64 from the state dict alone."""
    w = {k: v.double() for k, v in state.items()}
    B, T = idx.shape
    C, H = config.n_embd, config.n_head

    def ln(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def linear(x, prefix):
        return x @ w[prefix + ".weight"].t() + w[prefix + ".bias"]

    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(config.n_layer):
        p = f"transformer.h.{layer}"
        q, k, v = linear(ln(x, p + ".ln_1"), p + ".attn.c_attn").split(C, dim=-1)
        heads = [t.reshape(B, T, H, C // H).permute(0, 2, 1, 3) for t in (q, k, v)]
        scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(C // H)
        scores = scores.masked_fill(~mask, float("-inf"))
        y = (scores.softmax(-1) @ heads[2]).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + linear(y, p + ".attn.c_proj")
        h = linear(ln(x, p + ".ln_2"), p + ".mlp.c_fc")
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        x = x + linear(h, p + ".mlp.c_proj")
    return ln(x, "transformer.ln_f") @ w["lm_head.weight"].t()


@pytest.fixture
def hf_dir(tmp_path):
    """A small random Hugging Face GPT-2, saved the way the hub's checkpoints are."""
    config = GPT2Config(vocab_size=211, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # make the biases and norms non-trivial, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_forward_and_loss_match_float64_reference():
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 100, (3, 29))
    targets = torch.randint(0, 100, (3, 29))
    logits, no_loss = model(idx)
    no_logits, loss = model(idx, targets)
    assert no_loss is None and no_logits is None  # with targets the loss op alone sees the logits
    expected = reference_logits(model.state_dict(), model.config, idx)
    assert logits.shape == (3, 29, 128)
    err = (logits.double() - expected).abs().max().item()
    assert err < 1e-5, f"logits differ from the float64 reference by {err:.2e}"
    expected_loss = torch.nn.functional.cross_entropy(expected.view(-1, 128), targets.view(-1))
    assert abs(loss.item() - expected_loss.item()) < 1e-5


def test_initialisation_follows_gpt2():
    model = GPT(GPTConfig(**{**TINY, "n_embd": 192, "n_head": 3}))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * model.config.n_layer)
    for projection in (model.transformer.h[1].mlp.c_proj, model.transformer.h[1].attn.c_proj):
        assert abs(projection.weight.std().item() - scaled) < 0.1 * scaled
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_a_head_size_the_triton_attention_cannot_run_is_refused_when_the_model_is_built():
    from gpt2.ops import resolve

    config = GPTConfig(**{**TINY, "n_embd": 96, "n_head": 4})  # heads of 24
    with pytest.raises(KernelsError, match=r"head size 24 \(n_embd 96 / n_head 4\).*--kernels torch"):
        GPT(config, resolve("attention", "cpu"))
    GPT(config, resolve("gelu,layernorm", "cpu"))  # attention on PyTorch: any head size


def test_sequence_longer_than_block_size_is_an_error():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_from_pretrained_logits_equal_hf(hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(str(hf_dir), kernels="torch").eval()
    idx = torch.randint(0, 211, (2, 37))
    with torch.no_grad():
        err = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert err < 1e-4, f"max abs logit difference {err:.2e}"
    # HF's Conv1D stores (in, out); ours must be the transpose, not a same-shaped accident
    key = "transformer.h.0." + HF_TRANSPOSED[0]
    assert torch.equal(model.state_dict()[key], hf.state_dict()[key].t())


def test_from_pretrained_reads_the_hubs_own_layout(hf_dir, tmp_path):
    """The hub's GPT-2 files predate transformers' prefixes: keys without "transformer.", no lm_head (tied),
    and each layer's causal-mask buffers (attn.bias, attn.masked_bias), which hold no weights."""
    from safetensors.torch import load_file, save_file

    state = load_file(hf_dir / "model.safetensors")
    hub = {key.removeprefix("transformer."): value for key, value in state.items() if key != "lm_head.weight"}
    positions = json.loads((hf_dir / "config.json").read_text())["n_positions"]
    for layer in range(3):
        hub[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
        hub[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file(hub, folder / "model.safetensors", metadata={"format": "pt"})
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(str(folder), kernels="torch").eval()
    idx = torch.randint(0, 211, (2, 37))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_greedy_generation_equals_hf(hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_pretrained(str(hf_dir)).eval()
    idx = torch.randint(0, 211, (2, 5))
    ours = model.generate(idx, max_new_tokens=12, top_k=1)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def save_small_hf(directory, **config):
    """A one-layer random Hugging Face GPT-2 with `config` overriding its GPT2Config."""
    config = {"vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 1, "n_head": 2, **config}
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("setting, value", [
    ("tie_word_embeddings", False), ("layer_norm_epsilon", 1e-3), ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True), ("n_inner", 100), ("activation_function", "relu"),
])
def test_from_pretrained_refuses_configs_it_cannot_represent(tmp_path, setting, value):
    with pytest.raises(ValueError, match=f"{setting}={value!r} is not supported"):
        GPT.from_pretrained(save_small_hf(tmp_path, **{setting: value}))


def test_from_pretrained_takes_settings_that_change_no_math(tmp_path):
    """n_inner spelled out as 4 * n_embd; reorder_and_upcast_attn only changes where attention rounds."""
    directory = save_small_hf(tmp_path, n_inner=64, reorder_and_upcast_attn=True)
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        err = (GPT.from_pretrained(directory).eval()(idx)[0] - hf(idx).logits).abs().max().item()
    assert err < 1e-4, f"max abs logit difference {err:.2e}"


def test_from_pretrained_padded_vocab_keeps_the_bpe_vocab_real(tmp_path):
    padded = GPT.from_pretrained(save_small_hf(tmp_path / "padded", vocab_size=50304))
    assert (padded.config.vocab_size, padded.config.real_vocab_size) == (50304, 50257)  # 50257 on: padding
    small = GPT.from_pretrained(save_small_hf(tmp_path / "small"))
    assert (small.config.vocab_size, small.config.real_vocab_size) == (50, 50)


def test_triton_imported_before_the_interpreter_is_a_clear_error(hf_dir, monkeypatch):
    """Off CUDA, the Triton interpreter must be on before triton is imported; later, resolving the op set says
    what to do instead of failing inside the interpreter."""
    import triton  # noqa: F401 -- as importing transformers does

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KernelsError, match="start the command with TRITON_INTERPRET=1"):
        GPT.from_pretrained(str(hf_dir), kernels="triton")


def test_generation_crops_context_to_block_size():
    model = GPT(GPTConfig(**TINY)).eval()
    out = model.generate(torch.randint(0, 100, (1, 30)), max_new_tokens=10, top_k=1)
    assert out.shape == (1, 40)


def test_top_k_never_samples_outside_top_k_or_padding(monkeypatch):
    model = GPT(GPTConfig(**TINY)).eval()
    scores = torch.randn(128)
    scores[100:] = 100.0  # padded ids most likely of all: they must still never come out
    monkeypatch.setattr(model, "forward", lambda idx: (scores.expand(idx.shape[0], idx.shape[1], 128), None))
    allowed = set(torch.topk(scores[:100], 5).indices.tolist())
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), max_new_tokens=50, top_k=5,
                         generator=torch.Generator().manual_seed(3))
    assert set(out[:, 1:].flatten().tolist()) <= allowed
    full = model.generate(torch.zeros(4, 1, dtype=torch.long), max_new_tokens=50, top_k=None, temperature=5.0)
    assert full[:, 1:].max().item() < 100


def test_temperature_0_and_tiny_ones_are_greedy_and_a_negative_one_is_refused():
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 100, (3, 4))
    greedy = model.generate(idx, max_new_tokens=12, top_k=1)
    for temperature in (0.0, 1e-300, 5e-324):  # 1e-300 is 0 in float32: the logits would divide by 0
        out = model.generate(idx, max_new_tokens=12, temperature=temperature, generator=torch.Generator().manual_seed(2))
        assert torch.equal(out, greedy), temperature
    assert not torch.equal(model.generate(idx, max_new_tokens=12, generator=torch.Generator().manual_seed(2)), greedy)
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or a positive number, got -1"):
        model.generate(idx, max_new_tokens=1, temperature=-1.0)


def test_top_k_0_or_less_means_no_top_k():
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 100, (3, 4))

    def run(top_k):
        return model.generate(idx, max_new_tokens=20, top_k=top_k, generator=torch.Generator().manual_seed(5))

    assert torch.equal(run(0), run(None)) and torch.equal(run(-1), run(None))


def test_sampling_is_deterministic_for_a_seed():
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 100, (3, 4))

    def run(seed):
        return model.generate(idx, max_new_tokens=20, top_k=50, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_export_round_trip_through_transformers(tmp_path):
    model = GPT(GPTConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "export"))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert hf.config.vocab_size == 100  # the padded rows are cut away
    back = GPT.from_pretrained(str(tmp_path / "export")).eval()
    idx = torch.randint(0, 100, (2, 31))
    with torch.no_grad():
        ours = model(idx)[0][..., :100]
        assert (hf(idx).logits - ours).abs().max().item() < 1e-4
        assert (back(idx)[0] - ours).abs().max().item() < 1e-5


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(ValueError, match="no folder"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown model 'openai-community/gpt2': .* without their openai-community/"):
        GPT.from_pretrained("openai-community/gpt2")
    (tmp_path / "ckpt_000010.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file: .* as --checkpoint"):
        GPT.from_pretrained(str(tmp_path / "ckpt_000010.pt"))


def _rewrite_weights(directory, change):
    """The folder's model.safetensors with change(tensors) applied to its dict of tensors."""
    from safetensors.torch import load_file, save_file

    path = pathlib.Path(directory) / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_from_pretrained_refuses_weights_that_do_not_fill_the_model(tmp_path):
    """transformers fills missing or misshapen tensors with random values and drops extra ones, with a
    warning: from_pretrained must not hand back such a half-random model."""
    lacking = save_small_hf(tmp_path / "lacking", n_layer=2)
    _rewrite_weights(lacking, lambda t: [t.pop(k) for k in list(t) if k.startswith("transformer.h.1.")])
    with pytest.raises(ValueError, match=r"the weights lack \d+ tensors .*transformer\.h\.1\..*inconsistent"):
        GPT.from_pretrained(lacking)
    extra = save_small_hf(tmp_path / "extra")
    _rewrite_weights(extra, lambda t: t.update({"transformer.h.1.ln_1.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match=r"hold 1 tensors that its config.json's model has no place for"):
        GPT.from_pretrained(extra)
    misshapen = save_small_hf(tmp_path / "misshapen")
    _rewrite_weights(misshapen, lambda t: t.update({"transformer.ln_f.bias": torch.ones(17)}))
    with pytest.raises(ValueError, match=r"transformer.ln_f.bias is \(17,\) in the weights but \(16,\)"):
        GPT.from_pretrained(misshapen)


def test_from_pretrained_refuses_other_models_and_damaged_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(llama)
    with pytest.raises(ValueError, match="holds a 'llama' model .* GPT-2 only"):
        GPT.from_pretrained(str(llama))
    damaged = save_small_hf(tmp_path / "damaged")
    weights = pathlib.Path(damaged) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LoadError, match="its weights are damaged .* save_pretrained"):
        GPT.from_pretrained(damaged)
    weights.unlink()
    with pytest.raises(LoadError, match=f"could not read the weights in {damaged}"):
        GPT.from_pretrained(damaged)
    unbuildable = save_small_hf(tmp_path / "unbuildable")
    config = json.loads((tmp_path / "unbuildable" / "config.json").read_text())
    (tmp_path / "unbuildable" / "config.json").write_text(json.dumps({**config, "n_head": 3}))  # 16 % 3 != 0
    with pytest.raises(ValueError, match="its config.json describes no model transformers can build"):
        GPT.from_pretrained(unbuildable)


def test_save_pretrained_to_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file: save_pretrained writes a folder"):
        GPT(GPTConfig(**TINY)).save_pretrained(str(tmp_path / "file"))


def test_configure_optimizers_decays_only_matrices():
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, device_type="cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # the tied weight once, nothing left out


def test_unreachable_hub_is_a_clear_error():
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "from gpt2 import GPT\nGPT.from_pretrained('gpt2')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pass a local directory written by save_pretrained" in result.stderr


@pytest.mark.gpu
def test_compiled_triton_model_trains_like_eager():
    """The model as train.py runs it on a GPU: every op on Triton (the fp32 residual stream and bf16 sublayer
    outputs of add_layer_norm under autocast), torch.compile'd in one graph; its loss and every gradient
    against the same model in eager mode, whose ops launch the same kernels directly."""
    from gpt2.ops import resolve

    device = torch.device("cuda")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=128, vocab_size=512),
                resolve("triton", device)).to(device)
    idx, targets = torch.randint(0, 512, (2, 4, 128), device=device).unbind()

    def loss_and_grads(runnable):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = runnable(idx, targets)
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    want_loss, want = loss_and_grads(model)
    got_loss, got = loss_and_grads(torch.compile(model, dynamic=False, fullgraph=True))
    assert abs(got_loss - want_loss) <= 1e-2 * abs(want_loss), (got_loss, want_loss)
    for name, grad in got.items():
        err = ((grad - want[name]).norm() / want[name].norm()).item()
        assert err < 5e-2, f"{name}: the compiled gradient is {err:.1e} off the eager one (relative norm)"
