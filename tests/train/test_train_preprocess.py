"""``mbridge data preprocess``: JSONL -> Megatron-Core indexed dataset with a tokenizer built
here (a tiny ``tokenizers`` WordLevel model wrapped in PreTrainedTokenizerFast); the ids
read back by Megatron-Core's IndexedDataset equal the tokenizer's; bad input writes nothing."""

import json
from pathlib import Path

import numpy as np
import pytest

from mbridge.cli import main

LINES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song",
         "cats and dogs play", "the sun is warm today"]


def make_tokenizer(directory: Path, lines=LINES) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(directory)
    return directory


def write_jsonl(path: Path, texts, key="text") -> Path:
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


def test_preprocess_round_trips_through_megatron(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    tok_dir = make_tokenizer(tmp_path / "tok")
    src = write_jsonl(tmp_path / "in.jsonl", LINES * 3)
    prefix = tmp_path / "out" / "corpus_text_document"
    assert main(["data", "preprocess", "--input", str(src), "--tokenizer", str(tok_dir),
                 "--output-prefix", str(prefix), "--append-eod", "--no-progress"]) == 0
    assert "15 documents" in capsys.readouterr().out
    ds = IndexedDataset(str(prefix))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(ds) == 15
    for i, text in enumerate(LINES * 3):
        expected = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ds[i].tolist() == expected
    assert ds[0].dtype == np.uint16  # smallest dtype for the vocabulary
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "corpus_text_document.bin", "corpus_text_document.idx"]


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"text": oops}\n', "in.jsonl:2: not valid JSON"),
    ('{"body": "the cat"}\n', "no text field 'text'"),
    ("\n\n", "no non-empty documents"),
])
def test_bad_input_fails_and_writes_nothing(tmp_path, capsys, content, message):
    tok_dir = make_tokenizer(tmp_path / "tok")
    (tmp_path / "in.jsonl").write_text(content)
    out = tmp_path / "out"
    code = main(["data", "preprocess", "--input", str(tmp_path / "in.jsonl"), "--tokenizer",
                 str(tok_dir), "--output-prefix", str(out / "x"), "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_missing_input_or_tokenizer(tmp_path, capsys):
    args = ["data", "preprocess", "--output-prefix", str(tmp_path / "x"), "--no-progress"]
    assert main(args + ["--input", str(tmp_path / "no.jsonl"), "--tokenizer", "."]) == 2
    assert "no such file" in capsys.readouterr().err
    src = write_jsonl(tmp_path / "in.jsonl", LINES)
    assert main(args + ["--input", str(src), "--tokenizer", str(tmp_path / "none")]) == 2
    assert "does not exist; --tokenizer takes a local directory" in capsys.readouterr().err


def test_non_utf8_input_names_file_and_line(tmp_path, capsys):
    tok_dir = make_tokenizer(tmp_path / "tok")
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "the cat"}\n{"text": "caf\xe9"}\n')
    out = tmp_path / "out"
    code = main(["data", "preprocess", "--input", str(tmp_path / "in.jsonl"), "--tokenizer",
                 str(tok_dir), "--output-prefix", str(out / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {tmp_path / 'in.jsonl'}:2: not UTF-8 text"), err
    assert list(out.iterdir()) == []


def test_preprocess_output_is_quiet_and_its_bar_reaches_100(tmp_path):
    """No Transformer Engine/Apex notices (a preprocess run uses neither), and the progress
    bar counts every byte of the input, blank lines and JSON included."""
    import subprocess
    import sys

    tok_dir = make_tokenizer(tmp_path / "tok")
    src = write_jsonl(tmp_path / "in.jsonl", LINES * 50)
    with src.open("a") as f:
        f.write("\n\n")
    proc = subprocess.run([sys.executable, "-m", "mbridge", "data", "preprocess", "--input",
                           str(src), "--tokenizer", str(tok_dir), "--output-prefix",
                           str(tmp_path / "out" / "x")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("tokenizing: 100%"), proc.stderr
    assert "not installed" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
