"""The model's outputs equal the golden record in tests/golden/outputs.pt: logits and tokens
of the base model, PARA, (IA)^3 and LoRA, solo and mixed in one batch, greedy and beam, on two
tiny checkpoints. The record was first written by the first-round code and the redesign kept
it; the checkpoints and adapter files (format version 1) are still the first round's, so this
also proves that version-1 files still load and mean the same. tests/golden/make_golden.py
computes these outputs (the test calls its `golden_outputs`) and rewrites the record when a
change is meant to change them."""

import pytest
import torch

from golden.make_golden import ARCHES, CASES, GOLDEN, golden_outputs

# The record was written on an Intel Xeon; on an AMD EPYC the logits differ by at most 1.4e-6
# (max |logit| 2.3, so a few float32 ulps: the CPUs' kernels sum in different orders). 1e-5
# leaves 7x headroom for other CPUs, while any real change moves a logit by far more (each
# adapter moves every prompt's logits by 0.29 or more). Tokens are compared exactly.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "outputs.pt", weights_only=True)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("case", CASES)
def test_outputs_match_the_golden_record(golden, arch, case):
    actual, expected = golden_outputs(arch, case), golden[arch][case]
    torch.testing.assert_close(actual["logits"], expected["logits"], **TOLERANCE)
    assert actual["greedy"] == expected["greedy"]
    assert actual["beam"] == expected["beam"]
