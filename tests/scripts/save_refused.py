"""Launched by tests/offline/test_output.py under torchrun (2 ranks): ``save_hf_pretrained``
into an existing directory (DP=2, then TP=2) is refused on every rank alike, with nothing
left waiting in a collective; into its source it is refused even with ``overwrite=True``;
with ``overwrite=True`` it writes. One RESULT line per rank and case.

usage: save_refused.py MODEL_DIR TARGET
"""

import sys
from pathlib import Path

from dist_util import report

from mbridge import AutoBridge
from mbridge.io.output import OutputError, OutputExists


def main() -> None:
    model_dir, target = Path(sys.argv[1]), Path(sys.argv[2])
    for tp in (1, 2):
        bridge = AutoBridge.from_hf_pretrained(model_dir)
        provider = bridge.to_megatron_provider()
        provider.tensor_model_parallel_size = tp
        model = provider.finalize().provide_distributed_model()
        for case, path, overwrite in (("exists", target, False),
                                      ("source", model_dir.parent, True)):
            try:
                bridge.save_hf_pretrained(model, path, overwrite=overwrite)
                report(tp=tp, case=case, refused=None)
            except (OutputExists, OutputError) as e:
                report(tp=tp, case=case, refused=type(e).__name__)
        bridge.save_hf_pretrained(model, target, overwrite=True)
        report(tp=tp, case="overwrite", written=(target / "config.json").is_file())


if __name__ == "__main__":
    main()
