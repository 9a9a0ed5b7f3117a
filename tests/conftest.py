"""Shared fixtures: tiny random checkpoints saved as real folders.

NUMBA_ENABLE_CUDASIM must be set before numba is first imported, so that the CUDA kernels run
(slowly) on the CPU simulator here.
"""

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def char_tokenizer():
    """save_char_tokenizer, for tests that build their own model folders."""
    return save_char_tokenizer


def save_char_tokenizer(folder) -> None:
    """A character-level tokenizer (pad 0, unk 1, printable characters from 2 to 101)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>") \
        .save_pretrained(folder)



@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer BertForMaskedLM (hidden 64, intermediate 160: a ragged 128-group) on disk,
    with a character-level tokenizer."""
    pytest.importorskip("torch")
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=160, max_position_embeddings=64, mask_token_id=4,
    )
    model = BertForMaskedLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path, safe_serialization=True)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer LlamaForCausalLM (hidden 64, intermediate 192) on disk, with a character-level
    tokenizer."""
    pytest.importorskip("torch")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=192, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    """A 2-block LLaDA (GQA: 4 query heads, 2 KV heads) in bfloat16 shards, as published."""
    pytest.importorskip("torch")
    from tests.dllm import write_dllm

    return write_dllm(tmp_path_factory.mktemp("tiny_llada"), "llada")


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    """A 2-block Dream (Qwen2 layout, GQA) in bfloat16 shards, as published."""
    pytest.importorskip("torch")
    from tests.dllm import write_dllm

    return write_dllm(tmp_path_factory.mktemp("tiny_dream"), "dream")


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """A 2-layer Qwen3-MoE (4 experts, top 2): transformers 5 runs the experts as fused 3-D
    parameters, the checkpoint stores them per expert, 2-D."""
    pytest.importorskip("torch")
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_moe")
    Qwen3MoeForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    save_char_tokenizer(path)
    return path


def diffusion_gemma_config(canvas_length: int = 8, **text_overrides):
    """A tiny DiffusionGemma config: 2 layers alternating sliding (window 8) and full attention,
    4 experts (top 2) stored fused, a 1-layer vision tower, canvas 8, char-tokenizer vocab
    (text_overrides change the text config)."""
    from transformers import DiffusionGemmaConfig

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                global_head_dim=16, num_global_key_value_heads=1, num_experts=4,
                top_k_experts=2, max_position_embeddings=64, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"]) | text_overrides
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                  patch_size=4, position_embedding_size=16)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                canvas_length=canvas_length,
                                boi_token_id=120, eoi_token_id=121, image_token_id=122)


@pytest.fixture(scope="session")
def tiny_diffusion_gemma(tmp_path_factory):
    """A tiny random DiffusionGemmaForBlockDiffusion on disk (encoder and decoder share their
    weights; the checkpoint names the decoder's), with a character-level tokenizer."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        pytest.skip("this transformers has no DiffusionGemma")
    import torch

    torch.manual_seed(0)
    model = transformers.DiffusionGemmaForBlockDiffusion(diffusion_gemma_config()).eval()
    path = tmp_path_factory.mktemp("tiny_diffusion_gemma")
    model.save_pretrained(path, safe_serialization=True)
    save_char_tokenizer(path)
    return path
