"""PEFT LoRA adapters converted to GGUF agree with PEFT when llama.cpp applies them.

Converter-only tests need just the ``gguf`` package; the agreement tests need the optional
``llama_cpp`` (``pip install hyperlex[llamacpp]``) and are skipped without it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from hyperlex.engines.llamacpp import gguf_base, gguf_lora
from hyperlex.engines.llamacpp.gguf_base import write_base_gguf
from hyperlex.engines.llamacpp.gguf_lora import cached_gguf_adapter, convert_adapter, permute_qk
from hyperlex.errors import HyperlexError

from .conftest import write_adapter

TOKENS = [1, 40, 41, 42, 100, 200, 300, 17, 5, 9, 2, 77]  # every position is compared
KL_LIMIT = 1e-6
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- helpers


class LlamaCpp:
    """The llama.cpp low-level calls an engine needs: load a model and LoRA adapters, set
    adapters with scales on a context, decode a batch, read logits."""

    def __init__(self, path: Path) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(),
                                                   lc.llama_model_default_params())
        assert self.model, f"llama.cpp could not load {path}"
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)

    def adapter(self, path: Path) -> Any:
        adapter = self.lc.llama_adapter_lora_init(self.model, str(path).encode())
        assert adapter, f"llama.cpp could not load the adapter {path}"
        return adapter

    def _context(self, adapters: list[tuple[Any, float]]) -> Any:
        lc = self.lc
        params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 256
        params.n_threads = params.n_threads_batch = 1  # robust on a busy machine
        # Exact arithmetic: llama.cpp's defaults (flash attention "auto" and an F16 KV cache)
        # move the real model's logits by a KL of ~3e-5 from transformers' fp32 result.
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = params.type_v = lc.GGML_TYPE_F32
        ctx = lc.llama_init_from_model(self.model, params)
        n = len(adapters)
        handles = (lc.llama_adapter_lora_p_ctypes * max(n, 1))(*[a for a, _ in adapters])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        assert lc.llama_set_adapters_lora(ctx, handles if n else None, n,
                                          scales if n else None) == 0
        return ctx

    def _decode(self, ctx: Any, tokens: list[int], start: int, all_logits: bool) -> None:
        lc = self.lc
        batch = lc.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i] = token, start + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = all_logits or i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            assert lc.llama_decode(ctx, batch) == 0
        finally:
            lc.llama_batch_free(batch)

    def logits(self, tokens: list[int], adapters: list[tuple[Any, float]] = ()) -> Any:
        """Next-token logits at every position of ``tokens`` (a fresh context each call)."""
        import numpy as np

        ctx = self._context(list(adapters))
        try:
            self._decode(ctx, tokens, 0, all_logits=True)
            return np.ctypeslib.as_array(self.lc.llama_get_logits(ctx),
                                         shape=(len(tokens), self.n_vocab)).copy()
        finally:
            self.lc.llama_free(ctx)

    def greedy(self, tokens: list[int], n: int, adapters: list[tuple[Any, float]] = ()) -> list:
        import numpy as np

        ctx = self._context(list(adapters))
        out: list[int] = []
        try:
            self._decode(ctx, tokens, 0, all_logits=False)
            for step in range(n):
                row = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, -1),
                                            shape=(self.n_vocab,))
                out.append(int(row.argmax()))
                self._decode(ctx, out[-1:], len(tokens) + step, all_logits=False)
            return out
        finally:
            self.lc.llama_free(ctx)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self.lc.llama_token * (len(data) + 8))()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, True)
        assert n >= 0
        return list(buf[:n])

    def close(self) -> None:
        self.lc.llama_model_free(self.model)


def max_kl(reference: Any, other: Any) -> float:
    """max over positions of KL(softmax(reference) || softmax(other)), in float64."""
    import torch

    p = torch.log_softmax(torch.as_tensor(reference, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(other, dtype=torch.float64), -1)
    return float((p.exp() * (p - q)).sum(-1).max())


def peft_logits(base_dir: Path, adapter_dir: Path | None, tokens: list[int]) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(torch.tensor([tokens])).logits[0].numpy()


def make_adapter(target: Path, base: Path, seed: int = 3, **lora: Any) -> Path:
    """A random PEFT adapter on the tiny base with any LoraConfig options."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ALL_PROJECTIONS, **lora}
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False,
                                                  task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(target)
    return target


def base_config(base: Path) -> dict[str, Any]:
    return json.loads((base / "config.json").read_text())


def adapter_alpha(path: Path) -> float:
    from gguf import GGUFReader

    return float(GGUFReader(path).fields["adapter.lora.alpha"].contents())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapter_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("adapter") / "adapter"
    write_adapter(target, tiny_base, seed=1)
    return target


@pytest.fixture(scope="module")
def llama(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("llama_cpp")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    path = write_base_gguf(tiny_base, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")
    runner = LlamaCpp(path)
    yield runner
    runner.close()


# ---------------------------------------------------------------- converter only


def test_adapter_gguf_has_llama_cpp_names_and_metadata(adapter_dir: Path, tiny_base: Path,
                                                       tmp_path: Path) -> None:
    from gguf import GGUFReader

    out = convert_adapter(adapter_dir, tmp_path / "a.gguf", base_config(tiny_base))
    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("GGUF.")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter",
                      "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    names = {t.name for t in reader.tensors}
    assert names == {f"blk.{n}.{m}.weight.lora_{s}" for n in range(2) for s in "ab"
                     for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                               "ffn_up", "ffn_down")}
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order
    assert shapes["blk.0.attn_k.weight.lora_a"] == (64, 4)  # in=64, r=4
    assert shapes["blk.0.attn_k.weight.lora_b"] == (4, 32)  # r=4, out=2 kv heads x 16
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)


def test_b_rows_of_q_and_k_are_permuted_like_llama_cpp_stores_them(
        adapter_dir: Path, tiny_base: Path, tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    peft = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1."
    config = base_config(tiny_base)
    for permute in (True, False):
        out = convert_adapter(adapter_dir, tmp_path / f"{permute}.gguf", config,
                              _permute_qk=permute)
        tensors = {t.name: np.asarray(t.data) for t in GGUFReader(out).tensors}
        for module, name, heads in (("self_attn.q_proj", "attn_q", 4),
                                    ("self_attn.k_proj", "attn_k", 2),
                                    ("self_attn.v_proj", "attn_v", None)):
            b = peft[f"{prefix}{module}.lora_B.weight"]
            expected = permute_qk(b, heads) if permute and heads else b
            np.testing.assert_array_equal(tensors[f"blk.1.{name}.weight.lora_b"], expected)
            np.testing.assert_array_equal(tensors[f"blk.1.{name}.weight.lora_a"],
                                          peft[f"{prefix}{module}.lora_A.weight"])


def test_converted_adapters_are_cached_by_content(adapter_dir: Path, tiny_base: Path,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = base_config(tiny_base)
    first = cached_gguf_adapter(adapter_dir, config)
    stamp = first.stat().st_mtime_ns
    assert first.parent.parent.parent == tmp_path / "home"  # under HYPERLEX_HOME

    def no_conversion(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_lora, "convert_adapter", no_conversion)
    assert cached_gguf_adapter(adapter_dir, config) == first
    assert first.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    changed = tmp_path / "changed"
    shutil.copytree(adapter_dir, changed)
    settings = json.loads((changed / "adapter_config.json").read_text())
    settings["lora_alpha"] = 16
    (changed / "adapter_config.json").write_text(json.dumps(settings))
    other = cached_gguf_adapter(changed, config)
    assert other != first and adapter_alpha(other) == 16.0
    # the head layout drives the q/k permutation, so it is part of the key
    same_shapes = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
    assert cached_gguf_adapter(adapter_dir, {**config, **same_shapes}) != first


def test_the_base_is_described_by_its_config_directory_or_gguf(tiny_base: Path,
                                                               tmp_path: Path) -> None:
    from transformers import AutoConfig

    gguf_file = write_base_gguf(tiny_base, tmp_path / "tiny.gguf")
    shapes = {gguf_lora.base_shape(source) for source in (
        base_config(tiny_base), AutoConfig.from_pretrained(tiny_base), tiny_base, str(tiny_base),
        gguf_file)}
    assert shapes == {gguf_lora.BaseShape("llama", 2, 64, 128, 4, 2, 16)}


def test_base_ggufs_for_local_bases_are_written_once(tiny_base: Path, tmp_path: Path) -> None:
    from hyperlex.engines.models import resolve_base

    base = resolve_base(str(tiny_base))
    exact = gguf_base.base_gguf(base, exact=True, progress=False)
    assert exact.parent == tmp_path / "home" / "gguf" / "bases" and "-f32-" in exact.name
    stamp = exact.stat().st_mtime_ns
    assert gguf_base.base_gguf(base, exact=True, progress=False) == exact
    assert exact.stat().st_mtime_ns == stamp
    half = gguf_base.base_gguf(base, exact=False, progress=False)
    assert "-f16-" in half.name and half.stat().st_size < exact.stat().st_size * 0.75
    with pytest.raises(HyperlexError, match="needs the base on disk"):
        gguf_base.base_gguf(resolve_base("someone/some-model"))


def _edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _dora(target: Path, base: Path, source: Path) -> None:
    make_adapter(target, base, use_dora=True, target_modules=["q_proj"])


def _lora_only_bias(target: Path, base: Path, source: Path) -> None:
    make_adapter(target, base, bias="lora_only", target_modules=["v_proj"])


def _lora_bias(target: Path, base: Path, source: Path) -> None:
    make_adapter(target, base, lora_bias=True, target_modules=["v_proj"])


def _embedding(target: Path, base: Path, source: Path) -> None:
    make_adapter(target, base, target_modules=["embed_tokens"])


def _lm_head(target: Path, base: Path, source: Path) -> None:
    make_adapter(target, base, target_modules=["q_proj", "lm_head"])


def _modules_to_save(target: Path, base: Path, source: Path) -> None:
    shutil.copytree(source, target)
    _edit_config(target, modules_to_save=["lm_head"])


def _trainable_tokens(target: Path, base: Path, source: Path) -> None:
    shutil.copytree(source, target)
    _edit_config(target, trainable_token_indices=[1, 2])


def _unknown_module(target: Path, base: Path, source: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = {k.replace("layers.0.mlp.up_proj", "layers.0.mlp.fc_in"): v
               for k, v in load_file(target / "adapter_model.safetensors").items()}
    save_file(weights, target / "adapter_model.safetensors")


def _pickle_only(target: Path, base: Path, source: Path) -> None:
    target.mkdir()
    shutil.copy(source / "adapter_config.json", target)
    (target / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


@pytest.mark.parametrize(("make", "problem"), [
    (_dora, "DoRA"),
    (_lora_only_bias, "LoRA bias (bias='lora_only')"),
    (_lora_bias, "LoRA bias"),
    (_embedding, "token embedding"),
    (_lm_head, "lm_head"),
    (_modules_to_save, "modules_to_save"),
    (_trainable_tokens, "trainable tokens"),
    (_unknown_module, "unknown target module"),
    (_pickle_only, "adapter_model.bin is a pickle file"),
], ids=lambda value: getattr(value, "__name__", "").strip("_") or None)
def test_adapters_llama_cpp_cannot_express_are_refused(make, problem: str, adapter_dir: Path,
                                                       tiny_base: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-adapter"
    make(bad, tiny_base, adapter_dir)
    with pytest.raises(HyperlexError) as caught:
        convert_adapter(bad, tmp_path / "out.gguf", base_config(tiny_base))
    message = str(caught.value)
    assert str(bad) in message and problem in message
    assert not (tmp_path / "out.gguf").exists()


def test_an_adapter_for_another_base_or_a_non_llama_base_is_refused(
        adapter_dir: Path, tiny_base: Path, tmp_path: Path) -> None:
    config = base_config(tiny_base)
    with pytest.raises(HyperlexError, match="do not fit the base"):
        convert_adapter(adapter_dir, tmp_path / "a.gguf", {**config, "hidden_size": 128})
    with pytest.raises(HyperlexError, match="model_type 'gpt2'"):
        convert_adapter(adapter_dir, tmp_path / "a.gguf", {**config, "model_type": "gpt2"})


# ---------------------------------------------------------------- agreement in llama.cpp


def test_f32_base_gguf_runs_the_same_weights_and_tokenizer(llama: LlamaCpp,
                                                           tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    assert max_kl(peft_logits(tiny_base, None, TOKENS), llama.logits(TOKENS)) < KL_LIMIT
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    for text in ("What is time? Time is the measure of change.", "  two\n\nlines\t tab 2024",
                 "<|im_start|>user\nhéllo 😀<|im_end|>\n"):
        assert llama.tokenize(text) == tokenizer.encode(text)
    template = llama.lc.llama_model_chat_template(llama.model, None).decode()
    assert template == tokenizer.chat_template


def test_converted_adapter_reproduces_peft_in_llama_cpp(llama: LlamaCpp, tiny_base: Path,
                                                        adapter_dir: Path,
                                                        tmp_path: Path) -> None:
    reference = peft_logits(tiny_base, adapter_dir, TOKENS)
    adapter = llama.adapter(convert_adapter(adapter_dir, tmp_path / "a.gguf",
                                            base_config(tiny_base)))
    assert max_kl(reference, llama.logits(TOKENS, [(adapter, 1.0)])) < KL_LIMIT
    # the check has teeth: the adapter changes the distribution far beyond the limit
    assert max_kl(reference, llama.logits(TOKENS)) > 1000 * KL_LIMIT


def test_leaving_out_the_qk_permutation_is_caught(llama: LlamaCpp, tiny_base: Path,
                                                   adapter_dir: Path, tmp_path: Path) -> None:
    reference = peft_logits(tiny_base, adapter_dir, TOKENS)
    unpermuted = llama.adapter(convert_adapter(adapter_dir, tmp_path / "a.gguf",
                                               base_config(tiny_base), _permute_qk=False))
    assert max_kl(reference, llama.logits(TOKENS, [(unpermuted, 1.0)])) > 1000 * KL_LIMIT


@pytest.mark.parametrize(("options", "file_alpha"), [
    ({"use_rslora": True, "rank_pattern": {"q_proj": 8, "down_proj": 2}}, 0.0),
    ({"rank_pattern": {"k_proj": 2, "up_proj": 6}}, 8.0),  # alpha / r is PEFT's scaling
    ({"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"v_proj": 32, "gate_proj": 3}}, 0.0),
], ids=["rslora+rank_pattern", "rank_pattern", "alpha_pattern"])
def test_rslora_and_per_module_rank_and_alpha_are_folded_exactly(
        options: dict[str, Any], file_alpha: float, llama: LlamaCpp, tiny_base: Path,
        tmp_path: Path) -> None:
    peft_dir = make_adapter(tmp_path / "adapter", tiny_base, **options)
    out = convert_adapter(peft_dir, tmp_path / "a.gguf", base_config(tiny_base))
    assert adapter_alpha(out) == file_alpha
    assert max_kl(peft_logits(tiny_base, peft_dir, TOKENS),
                  llama.logits(TOKENS, [(llama.adapter(out), 1.0)])) < KL_LIMIT


def test_f16_base_gguf_is_close(llama: LlamaCpp, tiny_base: Path, adapter_dir: Path,
                                tmp_path: Path) -> None:
    half = LlamaCpp(write_base_gguf(tiny_base, tmp_path / "tiny-f16.gguf", dtype="f16"))
    try:
        adapter = half.adapter(convert_adapter(adapter_dir, tmp_path / "a.gguf",
                                               base_config(tiny_base)))
        assert max_kl(peft_logits(tiny_base, adapter_dir, TOKENS),
                      half.logits(TOKENS, [(adapter, 1.0)])) < 1e-3
    finally:
        half.close()


# ---------------------------------------------------------------- the real embedded model


@pytest.mark.real_model
def test_shipped_philosopher_agrees_with_peft_in_llama_cpp(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyperlex.engines.llamacpp.gguf_base import base_gguf
    from hyperlex.engines.models import embedded_gguf, ensure_embedded, resolve_base

    base_dir = ensure_embedded(progress=False)
    adapter_dir = Path(__file__).parents[1] / "personas" / "philosopher" / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is time?"}],
                                           add_generation_prompt=True, tokenize=False)
    tokens = tokenizer.encode(prompt)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir).eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=True)
        reference = out.logits[0].numpy()
        greedy: list[int] = []
        for _ in range(16):
            greedy.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([greedy[-1:]]), past_key_values=out.past_key_values,
                        use_cache=True)

    assert base_gguf(resolve_base(None), exact=False) == embedded_gguf()  # Q4_1, as shipped
    llama = LlamaCpp(base_gguf(resolve_base(None), exact=True, progress=False))
    try:
        assert llama.tokenize(prompt) == tokens
        adapter = llama.adapter(cached_gguf_adapter(adapter_dir, model.get_base_model().config))
        assert max_kl(reference, llama.logits(tokens, [(adapter, 1.0)])) < KL_LIMIT
        assert llama.greedy(tokens, 16, [(adapter, 1.0)]) == greedy
    finally:
        llama.close()
