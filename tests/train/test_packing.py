"""Packed sequences: first-fit packing and document boundaries (pure, hypothesis over
document lengths), ``mbridge data pack`` (real files, a tokenizer built here), and the
packing law on real Megatron-Core over gloo: a packed row's loss and gradients equal its
documents run one by one at TP=1, TP=2 and PP=2 (tests/train/scripts/packing_law.py; fp32
tolerances stated there), while the same row without boundaries differs."""

import json
from pathlib import Path

import pytest
from dist_util import torchrun
from hypothesis import given
from hypothesis import strategies as st
from sft_tokenizer import make_tokenizer

from mbridge.cli import main
from mbridge.shell.sft import PackedDataset, read_packed
from mbridge.train import packing

LAW = Path(__file__).parent / "scripts" / "packing_law.py"


@given(st.lists(st.integers(1, 16), max_size=30), st.integers(16, 40))
def test_first_fit_places_every_document_once_within_capacity(lengths, capacity):
    bins = packing.first_fit(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b == sorted(b) for b in bins)  # documents keep their order inside a row
    # first fit: no document fits in an earlier bin than the one it went to, as it was then
    for k, b in enumerate(bins):
        for i in b:
            for earlier in bins[:k]:
                used = sum(lengths[j] for j in earlier if j < i)
                assert used + lengths[i] > capacity


@given(st.lists(st.integers(1, 10), min_size=1, max_size=6), st.integers(0, 5))
def test_boundaries_and_positions_restart_in_every_document(lengths, pad):
    total = sum(lengths) + pad
    cu = packing.cu_seqlens(lengths, total)
    assert cu[0] == 0 and cu[-1] == total and len(cu) == len(lengths) + 1 + (pad > 0)
    pos = packing.positions(lengths, total)
    assert len(pos) == total
    for a, b in zip(cu, cu[1:]):
        assert pos[a:b] == list(range(b - a))


def test_first_fit_refuses_a_document_longer_than_a_row():
    with pytest.raises(ValueError, match="document 1 has 9 tokens"):
        packing.first_fit([3, 9], 8)


def test_data_pack_writes_rows_with_boundaries(tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tok", "plain")
    root = tmp_path / "data"
    root.mkdir()
    recs = [{"input": "what is the capital of france ?", "output": "paris ."},
            {"messages": [{"role": "user", "content": "hello"},
                          {"role": "assistant", "content": "hi there"}]},
            {"input": "two plus two ?", "output": "four"}]
    (root / "training.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "packed"
    assert main(["data", "pack", "--dataset-root", str(root), "--tokenizer", str(tok),
                 "--seq-length", "16", "--output", str(out)]) == 0
    assert "3 documents in 2 rows of 16" in capsys.readouterr().out
    rows = read_packed(out / "training.packed.jsonl")
    # inputs per document: 10 (prompt/completion), 6 (chat), 6: the third has no room left
    assert [r.seq_lengths for r in rows] == [[10, 6], [6]]
    assert rows[0].loss_mask == [0] * 7 + [1] * 3 + [0, 0, 0, 1, 1, 1]  # "hi there <|end|>"
    item = PackedDataset(rows, pad_id=1, seq_length=16)[1]
    assert item["cu_seqlens"] == [0, 6, 16] and item["position_ids"][:7] == [0, 1, 2, 3, 4, 5, 0]
    assert item["loss_mask"][6:] == [0] * 10
    assert main(["data", "pack", "--dataset-root", str(root), "--tokenizer", str(tok),
                 "--seq-length", "16", "--output", str(tmp_path / "x"), "--sft",
                 "loss_on=bogus"]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_packing_law(tp, pp):
    results = torchrun(LAW, str(tp), str(pp), nproc=tp * pp)
    assert len(results) == tp * pp
    for r in results:
        assert r["examples"] == 6 and r["leak_rel"] > 1e-2, r
