"""Every MIMO layout that cannot run is refused by the checks ``pretrain`` runs first, before
any process group or model exists (``mbridge.shell.pretrain.check``, which
``python -m mbridge.train --print-config`` runs alone): exit 2 with a message naming the fix.
In process, at the world size ``WORLD_SIZE`` says (as torchrun sets it), on a real tiny LLaVA
checkpoint. ``tests/vlm/test_mimo_training.py`` launches some of them under torchrun too.
"""

from __future__ import annotations

import pytest

from mbridge.train.__main__ import main

M = "model.module_parallelisms"
HETERO = ("model.deployment_mode=heterogeneous",)
COLOCATED = ("model.deployment_mode=colocated",)


@pytest.mark.parametrize("world, extra, message", [
    (2, (*HETERO, f"{M}.images.rank_offset=0", f"{M}.language.rank_offset=0"),
     "modules 'images' and 'language' both hold rank 0; shift the rank_offset of 'language'"),
    (3, (*HETERO, f"{M}.images.rank_offset=0", f"{M}.language.rank_offset=2"),
     "heterogeneous mode: ranks [1] hold no module"),
    (2, (*HETERO, f"{M}.images.rank_offset=0", f"{M}.language.rank_offset=2"),
     "module 'language' needs ranks 2..2 (rank_offset 2 + tp*pp*dp = 1) but the world has 2"),
    (2, (*COLOCATED, f"{M}.images.data_parallel=2", f"{M}.language.tensor_parallel=2",
         "train.global_batch_size=3", "train.micro_batch_size=1"),
     "global batch size 3 is not divisible by module 'images''s data_parallel=2"),
    (3, (*COLOCATED, f"{M}.images.data_parallel=3", f"{M}.language.tensor_parallel=3",
         "train.global_batch_size=3", "train.micro_batch_size=1"),
     "module 'language' has 4 attention heads, not divisible by its tensor_parallel=3"),
    (2, (*COLOCATED, f"{M}.images.data_parallel=2", f"{M}.language.pipeline_parallel=2"),
     "colocated mode needs pipeline_parallel=1 for every module"),
    (3, (*HETERO, f"{M}.images.pipeline_parallel=2", f"{M}.language.rank_offset=2"),
     "model.module_parallelisms.images.pipeline_parallel=2: an encoder module is not "
     "pipelined"),
    (4, (*HETERO, f"{M}.images.data_parallel=2", f"{M}.language.rank_offset=2",
         f"{M}.language.pipeline_parallel=2", "model.virtual_pipeline_model_parallel_size=2"),
     "model.virtual_pipeline_model_parallel_size (interleaved stages) is not supported with "
     "MIMO layouts yet"),
    (4, (*HETERO, f"{M}.images.data_parallel=2", f"{M}.language.rank_offset=2",
         f"{M}.language.pipeline_parallel=2", "data.sft.pad_to_multiple_of=8"),
     "data.sft.pad_to_multiple_of needs model.module_parallelisms.language.pipeline_parallel=1"),
    (4, (*HETERO, f"{M}.images.data_parallel=2", f"{M}.language.rank_offset=2",
         f"{M}.language.pipeline_parallel=2", "model.tensor_model_parallel_size=2"),
     "leave model.tensor_model_parallel_size and pipeline_model_parallel_size at 1"),
    (2, (*COLOCATED, f"{M}.images.data_parallel=2", f"{M}.language.data_parallel=2",
         "train.global_batch_size=2"),
     "train.global_batch_size=2 must be a positive multiple of train.micro_batch_size (2) "
     "x data-parallel size (2)"),
])
def test_layout_that_cannot_run_exits_2_naming_the_fix(world, extra, message, llava,
                                                       monkeypatch, capsys):
    hf_dir, data = llava
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["--recipe", "tiny_llava_finetune",
                 f"checkpoint.pretrained_checkpoint={hf_dir}", f"data.dataset_root={data.parent}",
                 *extra, "--print-config"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err


def test_language_pipeline_in_heterogeneous_mode_is_a_plan(llava, monkeypatch, capsys):
    """The same checks pass the layouts the four-rank runs use (the language model's PP=2
    among them)."""
    hf_dir, data = llava
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["--recipe", "tiny_llava_finetune",
                 f"checkpoint.pretrained_checkpoint={hf_dir}", f"data.dataset_root={data.parent}",
                 *HETERO, f"{M}.images.data_parallel=2",
                 f"{M}.language.rank_offset=2", f"{M}.language.pipeline_parallel=2",
                 "--print-config"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "pipeline_parallel: 2" in out.out
