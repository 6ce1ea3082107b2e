"""The plain ``torch.fx`` traces (``Tracer.trace`` of ``torch.fx.Tracer`` itself, which patches
``nn.Module.__call__`` for the whole process while it runs) that a cold inductor compile makes
in a fresh process, printed as JSON: where each came from. With ``prime`` as the first argument,
:func:`handler.compiled.prime_tracing` runs first, as the pipeline does before it compiles in the
background. make_fx's tracers (subclasses) call modules through and are not counted.

  python tests/support/fx_traces.py [prime|no-prime] CACHE_DIR
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[2]  # cold: a fresh folder

import torch  # noqa: E402
import torch.fx._symbolic_trace as symbolic  # noqa: E402
from torch import nn  # noqa: E402

from handler.compiled import prime_tracing  # noqa: E402


def main() -> None:
    if sys.argv[1] == "prime":
        prime_tracing()
    seen: list[str] = []
    original = symbolic.Tracer.trace

    def trace(self, root, *args, **kwargs):
        if type(self) is symbolic.Tracer:
            seen.append(traceback.format_stack(limit=4)[0].strip().splitlines()[0])
        return original(self, root, *args, **kwargs)

    symbolic.Tracer.trace = trace
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval())
    model(torch.randn(2, 3, 16, 16, requires_grad=True)).sum().backward()  # forward and backward graphs
    print(json.dumps({"plain_traces": seen}))


if __name__ == "__main__":
    main()
