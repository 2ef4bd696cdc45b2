"""SFT samples and loss masks (mbridge.train.sft through mbridge.shell.sft) with tokenizers
built here (tests/train/sft_tokenizer.py): prompt/completion; chat with generation markers,
without (boundaries inferred from rendered prefixes) and with a template where they cannot be
inferred (an error naming it); multi-turn masks hold exactly the assistant turns; ShareGPT;
truncation, minimum length and the counts of what was cut or dropped; padding."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sft_tokenizer import WORDS, make_tokenizer

from mbridge.shell.sft import SFTDataset, encode, load_tokenizer, read_split
from mbridge.train import sft
from mbridge.train.config import ConfigError
from mbridge.train.sft import SFTSpec, TemplateError

CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the capital of france ?"},
        {"role": "assistant", "content": "paris ."},
        {"role": "user", "content": "and germany ?"},
        {"role": "assistant", "content": "berlin"}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {name: load_tokenizer(make_tokenizer(root / name, name))
            for name in ("marked", "plain", "counted")} | {
        "none": load_tokenizer(make_tokenizer(root / "none", None))}


def loss_tokens(tok, tokens, mask):
    return [t for t, m in zip(tok.convert_ids_to_tokens(tokens), mask) if m]


def runs(tok, tokens, mask):
    names = tok.convert_ids_to_tokens(tokens)
    return [names[a:b] for a, b in sft.runs_of(mask)]


def test_prompt_completion_masks_the_completion_and_eos(toks):
    tok = toks["plain"]
    rec = {"input": "what is the capital of france ?", "output": "paris ."}
    tokens, mask = encode(rec, tok, SFTSpec())
    names = tok.convert_ids_to_tokens(tokens)
    assert names == ["<s>", "what", "is", "the", "capital", "of", "france", "?", "paris", ".",
                     "</s>"]
    assert mask == [False] * 8 + [True] * 3
    tokens_all, mask_all = encode(rec, tok, SFTSpec(loss_on="all"))
    assert tokens_all == tokens and all(mask_all)
    no_ends = encode(rec, tok, SFTSpec(add_bos=False, add_eos=False))
    assert tok.convert_ids_to_tokens(no_ends[0]) == names[1:-1]
    assert no_ends[1] == [False] * 7 + [True] * 2


def test_prompt_template_and_column_names(toks):
    tok = toks["plain"]
    spec = SFTSpec(input_key="q", output_key="a", prompt_template="question : {q} answer :",
                   separator=" ")
    tokens, mask = encode({"q": "two plus two ?", "a": "four"}, tok, spec)
    assert tok.convert_ids_to_tokens(tokens)[1:8] == ["question", ":", "two", "plus", "two",
                                                       "?", "answer"]
    assert loss_tokens(tok, tokens, mask) == ["four", "</s>"]
    with pytest.raises(sft.SFTDataError, match="prompt_template"):
        encode({"a": "four"}, tok, spec)


@pytest.mark.parametrize("template", ["marked", "plain"])
def test_multi_turn_chat_masks_exactly_the_assistant_turns(toks, template):
    tok = toks[template]
    tokens, mask = encode({"messages": CHAT}, tok, SFTSpec())
    assert tokens == tok(tok.apply_chat_template(CHAT, tokenize=False),
                         add_special_tokens=False)["input_ids"]
    assert runs(tok, tokens, mask) == [["paris", ".", "<|end|>"], ["berlin", "<|end|>"]]
    last = encode({"messages": CHAT}, tok, SFTSpec(loss_on="last"))
    assert last[0] == tokens and runs(tok, *last) == [["berlin", "<|end|>"]]
    assert all(encode({"messages": CHAT}, tok, SFTSpec(loss_on="all"))[1])


def test_markers_and_inferred_boundaries_agree(toks):
    assert encode({"messages": CHAT}, toks["marked"], SFTSpec()) == \
        encode({"messages": CHAT}, toks["plain"], SFTSpec())


def test_uninferable_template_is_an_error_naming_it(toks):
    with pytest.raises(TemplateError, match="counted chat template.*no \\{% generation %\\}"):
        encode({"messages": CHAT}, toks["counted"], SFTSpec())
    # loss on everything needs no boundaries
    assert all(encode({"messages": CHAT}, toks["counted"], SFTSpec(loss_on="all"))[1])
    with pytest.raises(TemplateError, match="no chat template"):
        encode({"messages": CHAT}, toks["none"], SFTSpec())


def test_sharegpt_is_the_same_conversation(toks):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    conv = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    assert encode({"conversations": conv}, toks["plain"], SFTSpec()) == \
        encode({"messages": CHAT}, toks["plain"], SFTSpec())
    with pytest.raises(sft.SFTDataError, match="from"):
        encode({"conversations": [{"from": "robot", "value": "hi"}]}, toks["plain"], SFTSpec())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(WORDS[:40]), min_size=1, max_size=4),
                          st.lists(st.sampled_from(WORDS[:40]), min_size=1, max_size=4)),
                min_size=1, max_size=4))
def test_any_conversation_masks_each_answer_and_its_end(toks, turns):
    """Random multi-turn conversations: the loss runs are each answer's words then <|end|>,
    with markers and with inferred boundaries alike."""
    msgs = [m for q, a in turns for m in ({"role": "user", "content": " ".join(q)},
                                          {"role": "assistant", "content": " ".join(a)})]
    expected = [a + ["<|end|>"] for _, a in turns]
    for name in ("marked", "plain"):
        tok = toks[name]
        assert runs(tok, *encode({"messages": msgs}, tok, SFTSpec())) == expected, name


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_truncation_and_counts(toks, tmp_path):
    tok = toks["plain"]
    recs = [{"input": "what is the capital of france ?", "output": "paris ."},  # 11 tokens
            {"input": "hi", "output": "hello"},  # 4 tokens
            {"input": "what is the capital of germany ? please be brief", "output": "berlin"}]
    path = write(tmp_path / "training.jsonl", recs)
    samples, stats = read_split(path, tok, SFTSpec(min_length=5), max_inputs=8)
    # record 0 cut to 9 tokens from the right (keeps "paris"), record 1 too short,
    # record 2 (13 tokens) loses its whole answer
    assert (stats.records, stats.samples, stats.truncated, stats.dropped_short,
            stats.dropped_no_loss) == (3, 1, 2, 1, 1)
    assert tok.convert_ids_to_tokens(samples[0][0])[-2:] == ["?", "paris"]
    left, stats = read_split(path, tok, SFTSpec(truncation="left"), max_inputs=8)
    assert stats.samples == 3 and stats.truncated == 2
    assert tok.convert_ids_to_tokens(left[2][0]) == ["capital", "of", "germany", "?", "please",
                                                     "be", "brief", "berlin", "</s>"]
    assert loss_tokens(tok, *left[2]) == ["berlin", "</s>"]
    assert "1 dropped with no loss token left" in read_split(
        path, tok, SFTSpec(min_length=5), max_inputs=8)[1].describe()


def test_bad_records_name_file_and_line(toks, tmp_path):
    path = tmp_path / "training.jsonl"
    path.write_text('{"input": "hi", "output": "hello"}\n{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="training.jsonl:2: record has none of"):
        read_split(path, toks["plain"], SFTSpec(), max_inputs=16)
    write(path, [{"messages": CHAT}])
    with pytest.raises(ConfigError, match="training.jsonl:1: .*counted chat template"):
        read_split(path, toks["counted"], SFTSpec(), max_inputs=64)


def test_shift_and_padding(toks):
    tok = toks["plain"]
    sample = encode({"input": "hi", "output": "hello"}, tok, SFTSpec())
    ds = SFTDataset([sample, encode({"input": "two plus two ?", "output": "four"}, tok,
                                    SFTSpec())], pad_id=1, seq_length=16, multiple=4)
    item = ds[0]
    assert item["tokens"] == sample[0][:-1] and item["labels"] == sample[0][1:]
    assert item["loss_mask"] == [0, 1, 1]  # scored on "hello" and "</s>"
    batch = ds.collate([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 8)  # longest 7 inputs -> a multiple of 4
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][0, 3:].tolist() == [1] * 5
    fixed = SFTDataset([sample], pad_id=1, seq_length=16, multiple=None)
    assert fixed.collate([fixed[0]])["tokens"].shape == (1, 16)
