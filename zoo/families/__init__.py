"""zoo.families: today's sparse vision-language models from transformers as zoo models.

>>> model = zoo.load("Qwen/Qwen3-VL-30B-A3B-Instruct")     # a transformers checkpoint (dir or hub id, offline cache)
>>> model = zoo.build("qwen3-vl-moe-tiny")                # a catalogue entry with a `transformers:` block
>>> model = FamilyModel(hf_model, processor)              # a live transformers model, converted in place
>>> out = model(**model.prompt_inputs(images, questions))  # ZooOutput: logits, loss, aux losses, routing_stats
>>> model.answer(images, questions)                       # through the model's processor and chat template
>>> model.save_pretrained("dir")                          # the transformers layout: the transformers class loads it
>>> export_sparse(upcycled_qwen3_vl, "dir")               # an upcycled Qwen3-VL as a transformers Qwen3-VL-MoE

Supported model types (`FAMILIES`): ``qwen3_vl_moe``, ``glm4v_moe``, ``llama4``, ``aria``, ``ernie4_5_vl_moe``,
``qwen3_omni_moe``, and the dense bases ``qwen3_vl`` and ``glm4v`` (upcycled by a zoo sparsity policy).
"""

from zoo.families.export import SPARSE_OF, export_sparse
from zoo.families.loading import build_family, is_family_checkpoint, load_family, transformers_config
from zoo.families.model import FamilyFFN, FamilyModel, chat_messages
from zoo.families.spec import FAMILIES, FamilySpec, family_spec

__all__ = ["FAMILIES", "SPARSE_OF", "FamilyFFN", "FamilyModel", "FamilySpec", "build_family", "chat_messages",
           "export_sparse", "family_spec", "is_family_checkpoint", "load_family", "transformers_config"]
