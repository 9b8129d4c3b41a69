"""Shared fixtures: a tiny random Llama with a real BPE tokenizer and chat template, tiny
persona bundles with real PEFT adapters, and installable fake plugin distributions.

Nothing is downloaded; everything is built in a temporary directory.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is time? Time is the measure of change. Let us distinguish two senses of the word.",
    "The quick brown fox jumps over the lazy dog. A poem about the sea and the moon.",
    "You are a helpful assistant. Answer the question briefly and clearly, please.",
    "Knowledge, truth, meaning, ethics, mind, freedom, beauty, justice, friendship.",
] * 20
TINY_BASE_NAME = "tiny-llama"


def build_tiny_base(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def write_bundle(root: Path, name: str, base_model: str = TINY_BASE_NAME,
                 adapter_seed: int | None = 0, extra_yaml: str = "",
                 tiny_base: Path | None = None) -> Path:
    """A persona bundle; with ``adapter_seed`` it gets a random (non-zero) PEFT LoRA adapter."""
    bundle = root / name
    bundle.mkdir(parents=True, exist_ok=True)
    adapter_line = "adapter: adapter/\n" if adapter_seed is not None else ""
    (bundle / "persona.yaml").write_text(textwrap.dedent(f"""\
        name: {name}
        title: The {name.title()}
        description: A test persona called {name}.
        base_model: {base_model}
        ADAPTER_LINEcontract:
          system: "You are {{persona}}. Scene: {{scene}}"
          style: [Be brief]
          generation: {{temperature: 0, max_new_tokens: 8}}
        routing:
          keywords: [{name}]
        """).replace("ADAPTER_LINE", adapter_line) + extra_yaml)
    if adapter_seed is not None:
        write_adapter(bundle / "adapter", tiny_base, adapter_seed)
    return bundle


def write_adapter(target: Path, tiny_base: Path | None, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    assert tiny_base is not None, "an adapter needs the tiny base"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # make the persona's effect large enough to change greedy tokens
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(target)


def install_plugin(site: Path, dist: str, module: str, code: str,
                   entry_name: str | None = None, version: str = "0.1.0") -> None:
    """Make ``dist`` an installed distribution on ``site`` with a ``hyperlex`` entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[hyperlex]\n{entry_name or dist} = {module}\n")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("models") / TINY_BASE_NAME)


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {name: write_bundle(root, name, adapter_seed=seed, tiny_base=tiny_base)
            for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tiny_bundles: dict[str, Path]):
    """The transformers engine over the tiny bundles, one per test module (a module that
    needs another engine defines its own ``engine``)."""
    from hyperlex.engines.torch.engine import TorchEngine
    from hyperlex.persona.bundle import Persona

    return TorchEngine([Persona.from_dir(p) for p in tiny_bundles.values()], base=str(tiny_base))


@pytest.fixture(scope="module")
def host():
    """A host with the built-in scene encoders and no installed plugins."""
    from hyperlex.host import Host
    from hyperlex.plugins import builtin_encoders

    return Host(extra_plugins={"encoders": builtin_encoders}, entry_points=False)


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Each test gets its own HYPERLEX_HOME, no third-party plugins unless it installs some,
    and a fresh CLI host."""
    from hyperlex import cli

    monkeypatch.setenv("HYPERLEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "")
    cli.reset_host()
    yield
    cli.reset_host()


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path where tests install fake plugin distributions."""
    import importlib

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    for name in [m for m in sys.modules if getattr(sys.modules[m], "__file__", None)
                 and str(site) in str(sys.modules[m].__file__)]:
        del sys.modules[name]


def bundles_plugin(*bundles: Path) -> str:
    """Source of a plugin module that registers the given bundle directories."""
    paths = json.dumps([str(b) for b in bundles])
    return f"""
        from hyperlex import hookimpl

        @hookimpl
        def register_personas(register):
            for path in {paths}:
                register(path)
        """


@pytest.fixture
def runner():
    """A click test runner (imported lazily: the fixtures module stays light)."""
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture
def tiny_plugin(plugin_site: Path, tiny_bundles: dict[str, Path],
                monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny alpha and beta bundles installed as the only third-party plugin."""
    install_plugin(plugin_site, "hyperlex-tiny", "hx_tiny",
                   bundles_plugin(tiny_bundles["alpha"], tiny_bundles["beta"]))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-tiny")
    return "hyperlex-tiny"


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's own exit status once everything is reported, skipping the
    interpreter's final garbage collection. Native thread pools (llama.cpp, torch) destroyed
    there while daemon threads (servers, generations) are still parked can abort the process
    ("terminate called without an active exception") after every test has passed; that would
    turn a green run red without anything being wrong with the code under test."""
    if _EXIT_STATUS:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
