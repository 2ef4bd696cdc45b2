"""Tokenizers built here for the SFT tests: a ``tokenizers`` WordLevel model (whitespace
words, punctuation split off) wrapped in PreTrainedTokenizerFast, with chat templates written
here: one with ``{% generation %}`` markers, one without (turn boundaries inferable), one
whose rendering of a prefix is not a prefix of the whole (boundaries not inferable)."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>",
            "<|end|>"]
WORDS = ("what is the capital of france paris germany berlin italy rome spain madrid "
         "answer question color sky blue grass green snow white two plus four three five "
         "hello hi there how are you fine thanks say a word be brief please ok yes no and "
         "turns : ? . , !").split()

_TURN = "<|{{ m.role }}|> "
MARKED = ("{% for m in messages %}" + _TURN + "{% if m.role == 'assistant' %}"
          "{% generation %}{{ m.content }} <|end|>{% endgeneration %}"
          "{% else %}{{ m.content }} <|end|>{% endif %} {% endfor %}"
          "{% if add_generation_prompt %}<|assistant|> {% endif %}")
PLAIN = ("{% for m in messages %}" + _TURN + "{{ m.content }} <|end|> {% endfor %}"
         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# the first line counts the turns: a prefix of the conversation renders another first line
COUNTED = ("turns : {{ messages | length }} {% for m in messages %}" + _TURN
           + "{{ m.content }} <|end|> {% endfor %}"
           "{% if add_generation_prompt %}<|assistant|> {% endif %}")
TEMPLATES = {"marked": MARKED, "plain": PLAIN, "counted": COUNTED}


def make_tokenizer(directory: Path, template: str | None = "plain", *, bos: bool = True) -> Path:
    """Save a tokenizer (vocabulary < 100) with chat template ``template`` (a TEMPLATES key
    or None) to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    for d in "0123456789":
        vocab.setdefault(d, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>" if bos else None, eos_token="</s>",
                                   additional_special_tokens=SPECIALS[4:])
    if template is not None:
        fast.chat_template = TEMPLATES[template]
    fast.save_pretrained(directory)
    return directory
