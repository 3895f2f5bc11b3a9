"""Tokenizers: a pretrained one by hub id / dir, or a word-level tokenizer trained offline on a named corpus."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from zoo.config import ConfigError, TokenizerConfig
from zoo.errors import MissingWeightsError
from zoo.registry import Registry

CORPORA: Registry[Callable[[], Iterable[str]]] = Registry("corpus")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


@CORPORA.register("easy-vqa")
def easy_vqa_text() -> list[str]:
    """Questions and answers of easy-vqa's train split (the package ships them; no network)."""
    from easy_vqa import get_answers, get_train_questions

    questions, answers, _ = get_train_questions()
    return list(questions) + list(answers) + list(get_answers())


def train_word_tokenizer(texts: Iterable[str], image_token: str = "<image>"):
    """Train a lower-cased word-level tokenizer (``tokenizers``) and wrap it as a transformers fast tokenizer.

    Ids 0-4 are ``<pad> <unk> <s> </s> <image>``; encoding prepends ``<s>``. Deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[*SPECIAL_TOKENS, image_token], min_frequency=1)
    tok.train_from_iterator(sorted(set(texts)), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=[image_token])


def build_tokenizer(config: TokenizerConfig, path: str | None = None):
    """Load the tokenizer from `path` (a saved zoo checkpoint), ``config.name``, or train it on ``config.train_on``.

    The image token is added as a special token when a pretrained tokenizer lacks it.
    """
    from transformers import AutoTokenizer

    source = path or config.name
    if source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise MissingWeightsError(f"tokenizer: cannot load {source!r} from a local dir or the offline cache: "
                                      f"{e}") from e
    elif config.train_on:
        texts = CORPORA.get(config.train_on, field="tokenizer.train_on")()
        tokenizer = train_word_tokenizer(texts, config.image_token)
    else:
        raise ConfigError("tokenizer: set tokenizer.name (hub id or dir) or tokenizer.train_on (a corpus name)")
    if config.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
