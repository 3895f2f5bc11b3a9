"""The original-LLaVA side of `bench/llava_parity.py`: runs in the isolated llava-torch environment, never in the
zoo's (it imports LLaVA's package, which pins transformers 4.36 and torch 2.0; nothing of the zoo).

    <llava venv>/bin/python bench/llava_original.py OUT_DIR CORPUS_TXT IMAGE_PNG PROMPT

Builds a tiny LLaVA-1.5 with LLaVA's own classes, the way its training script does (a random CLIP tower saved as a
transformers directory, ``LlavaLlamaForCausalLM`` from a ``LlavaConfig``, ``initialize_vision_modules`` with the
``mlp2x_gelu`` projector, LLaVA-1.5's config flags), a sentencepiece Llama tokenizer trained on CORPUS_TXT, and
saves it with ``save_pretrained`` in LLaVA's layout (``OUT_DIR/llava-v1.5-tiny``; tower in ``OUT_DIR/clip-tower``).
It reloads that directory the way LLaVA's ``load_pretrained_model`` does (in fp32: fp16 does not run on CPU here),
builds the inputs with LLaVA's ``tokenizer_image_token`` and ``process_images`` for IMAGE_PNG and PROMPT, and writes
``OUT_DIR/reference.safetensors``: ``input_ids`` [1, T] (``IMAGE_TOKEN_INDEX`` -200 at the image), ``pixel_values``
[1, 3, S, S] and ``logits`` [1, T', V] over the spliced sequence.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace


def build_tokenizer(corpus: Path, out: Path):
    """A Llama-style sentencepiece BPE (byte fallback, ids 0-2 = <unk> <s> </s>) as LLaVA's slow LlamaTokenizer,
    saved with its fast twin (``tokenizer.json``) beside ``tokenizer.model``."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "spm"), vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, normalization_rule_name="identity", split_digits=True,
                                   allow_whitespace_only_pieces=True, remove_extra_whitespaces=False)
    (out / "spm.model").rename(out / "tokenizer.model")
    slow = LlamaTokenizer(vocab_file=str(out / "tokenizer.model"), legacy=True)  # vicuna-7b-v1.5's setting
    slow.pad_token = slow.unk_token  # what LLaVA-1.5's training sets for vicuna
    fast = LlamaTokenizerFast(vocab_file=str(out / "tokenizer.model"), legacy=True, from_slow=True)
    fast.pad_token = fast.unk_token
    return slow, fast


def build_llava(tower_dir: Path, vocab_size: int):
    import torch
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=56, patch_size=14))
    tower.save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(tower_dir)
    config = LlavaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlavaLlamaForCausalLM(config)
    model.get_model().initialize_vision_modules(SimpleNamespace(
        vision_tower=str(tower_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu"))
    # the flags LLaVA-1.5's train.py writes into the config before saving
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = 512
    model.config.tune_mm_mlp_adapter = False
    model.config.freeze_mm_mlp_adapter = False
    model.config.mm_use_im_start_end = False
    model.config.mm_projector_lr = None
    model.config.mm_use_im_patch_token = False
    with torch.no_grad():  # spread the random weights so the logits are far from zero (a comparison with teeth)
        for name, param in model.named_parameters():
            if param.ndim == 2 and "vision_tower" not in name:
                param.normal_(0.0, 0.08)
    return model


def main(out: Path, corpus: Path, image_path: Path, prompt: str) -> None:
    import torch
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model import LlavaLlamaForCausalLM
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    checkpoint, tower_dir = out / "llava-v1.5-tiny", out / "clip-tower"
    slow, fast = build_tokenizer(corpus, out / "tokenizer")
    model = build_llava(tower_dir, len(slow))
    model.save_pretrained(checkpoint)  # LLaVA's layout: its config.json and model.safetensors
    fast.save_pretrained(checkpoint)
    slow.save_pretrained(checkpoint)  # tokenizer.model + the slow class in tokenizer_config.json (LLaVA reads it)

    # LLaVA's load_pretrained_model, minus fp16: the slow tokenizer, the model, then the tower from mm_vision_tower
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(checkpoint, low_cpu_mem_usage=False).eval()
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    image = Image.open(image_path).convert("RGB")
    pixels = process_images([image], tower.image_processor, model.config)
    ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels).logits
    save_file({"input_ids": ids.contiguous(), "pixel_values": pixels.contiguous(), "logits": logits.contiguous()},
              str(out / "reference.safetensors"))
    import transformers

    print(f"llava-torch side: torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{len(ids[0])} prompt ids, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
