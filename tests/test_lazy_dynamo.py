"""A process that only samples never imports ``torch._dynamo`` (seconds of import time, more on a loaded machine).

The custom op ``fastsampler::sample_packed`` imports dynamo on its first call, so eager steps call the backend
directly and the op is only used while tracing (tests/test_custom_ops.py checks that it still is).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_CODE = textwrap.dedent(
    """
    import sys

    import torch

    import fastsampler
    from fastsampler import Sampler, SamplingParams
    from fastsampler.backends import cpu

    backends = ["auto", "reference"] + (["cpu"] if cpu.is_available()[0] else [])
    x = torch.randn(3, 40)
    for b in backends:
        fastsampler.sample(x, SamplingParams(top_p=0.9, seed=1, logprobs=True, top_logprobs=2), backend=b)
        fastsampler.sample(x.numpy(), [SamplingParams(temperature=0.0)] * 3, output_token_ids=[[1], [], [2]],
                           backend=b)
        fastsampler.sampling_probs(x, SamplingParams(min_p=0.1), backend=b)
        s = Sampler(40, 4, eos_token_ids=[0], backend=b)
        slots = s.add(SamplingParams(repetition_penalty=1.2, logit_bias={1: 1.0}, n=3), [1, 2])
        s.sample(x, slots)
        s.sample(x[:2], [slots[2], slots[0]])
        s.sample(x, torch.tensor(slots))
    print("dynamo:", sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
    """
)


def test_first_samples_do_not_import_dynamo() -> None:
    env = dict(os.environ)
    env.pop("TORCH_COMPILE_DEBUG", None)
    res = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "dynamo: []", res.stdout
