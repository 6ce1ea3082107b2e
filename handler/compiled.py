"""The compiled Grad-CAM pass: ``torch.compile`` of the served model, batch sizes without recompiles.

``torch.compile`` traces through the target layer's forward hook; the graph breaks where the
hook makes the activation a leaf, so the backbone below the layer, which runs with grad off,
compiles as an inference graph (optionally frozen: weights folded in as constants) and the head
above it as a forward-and-backward graph that ``torch.autograd.grad`` runs. The maps
equal the eager engine's (tests/test_compiled*.py).

TorchServe hands the handler batches of 1..``batchSize`` requests. Each new batch size would
recompile, so the batch is either padded to a few bucket sizes (powers of two up to
``batchSize``) or its size marked dynamic; either way every graph is compiled in the worker's
``initialize``, so no request pays for compiling. Nothing here imports TorchServe or PIL.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from handler.buckets import bucket_for, bucket_sizes, pad_batch
from handler.cam import LeafCapture
from handler.vocab import COMPILE_BATCH_MODES, SWITCHES

__all__ = ["CHOICES", "BATCH_MODES", "bucket_sizes", "bucket_for", "pad_batch", "cache_dir", "CompiledPass",
           "prime_tracing"]

logger = logging.getLogger(__name__)


def prime_tracing() -> None:
    """Make, on this thread and now, the one ``torch.fx.symbolic_trace`` inductor runs on its first
    compile in a process (``InterpreterShim._dummy_gm``, then cached).

    While it traces, ``torch.fx`` patches ``nn.Module.__call__`` for the whole process: an eager
    forward that another thread runs at that moment fails with ``NameError: module is not
    installed as a submodule``. A worker that compiles in the background while its eager model
    serves therefore makes that trace before it serves: under load during a cold background
    compile, a batch of 8 failed with 500s that way.
    """
    try:
        from torch._inductor.loop_body import InterpreterShim

        InterpreterShim._dummy_gm()
    except Exception as exc:  # another torch: nothing to prime here, or a different name
        logger.info("no torch.fx trace to make before compiling in the background (%s: %s)",
                    type(exc).__name__, exc)

CHOICES = SWITCHES
BATCH_MODES = COMPILE_BATCH_MODES


def cache_dir(configured: str = "") -> str | None:
    """Where inductor keeps compiled kernels: ``configured``, else a folder in the user's cache
    (``$XDG_CACHE_HOME`` or ``~/.cache``) that every worker and server of this user shares, so a
    restarted worker or server loads its kernels instead of compiling them. None where that is
    not writable (a read-only home): inductor's default then, under the worker's temp dir."""
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "gradcam-serve", "inductor")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


class _Frozen(torch.nn.Module):
    """A compiled model whose graphs inductor compiles with ``freezing`` on.

    Freezing is read while dynamo traces (parameters become graph constants instead of inputs),
    not only by inductor, so ``torch.compile``'s options alone do not freeze; it is switched on
    around each call, and nowhere else in the process.
    """

    def __init__(self, compiled: torch.nn.Module) -> None:
        import torch._inductor.config as inductor_config

        super().__init__()
        self.compiled = compiled
        self._inductor_config = inductor_config

    def forward(self, *args, **kwargs):
        with self._inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def _graph_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledPass:
    """Compiles an engine's model and keeps the eager one to fall back to.

    Args:
        engine: a :class:`handler.cam.CamEngine`; its ``model`` is replaced by the compiled one.
        batch_size: the largest batch TorchServe hands over.
        batch_mode: ``buckets`` (pad to powers of two) or ``dynamic`` (batch dimension dynamic).
        backend: ``torch.compile`` backend.
        mode: ``torch.compile`` mode (``None``/``""`` for the default).
        cache: inductor's cache folder; empty for :func:`cache_dir`'s default.
        freeze: inductor only: fold the weights into the backbone's graph as constants (batch
            norms folded into the convolutions) instead of reading them as inputs on every call.
            The graph above the target layer trains (it is differentiated) and is never frozen.
        options: more inductor options for a frozen backbone, over this class's own (benchmarks
            compare with them, e.g. ``{"cpp.weight_prepack": True}``).
    """

    def __init__(self, engine, batch_size: int, batch_mode: str = "buckets", backend: str = "inductor",
                 mode: str | None = None, cache: str = "", freeze: bool = False,
                 options: dict | None = None) -> None:
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {', '.join(BATCH_MODES)}, not '{batch_mode}'")
        folder = cache_dir(cache)
        if folder:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        self.cache = folder
        self.engine = engine
        self.eager = engine.model
        self.batch_mode = batch_mode
        self.sizes = bucket_sizes(batch_size) if batch_mode == "buckets" else (batch_size, 1)
        # The target layer's place in the model takes a module that makes the leaf (forward hooks
        # of nested modules do not run under compile); the eager model is the same object.
        parent_name, _, child = engine.target_layer.rpartition(".")
        self._parent = engine.model.get_submodule(parent_name)
        engine.capture = LeafCapture(engine.layer)
        setattr(self._parent, child, engine.capture)
        self._child = child
        # The graph breaks at the leaf, so the blocks around it compile as frames of their own,
        # one per block instance (a ConvNeXt's four stages share one forward) and per batch size:
        # more than dynamo's default of 8 per function, past which it silently runs eager.
        limit = 16 * len(self.sizes)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
        self.frozen = freeze and backend == "inductor"
        # Freezing goes in the options too, so that they differ from an unfrozen model's: dynamo
        # hands a model the graphs it compiled for another instance of its class with equal
        # options, and a frozen model compiled after an unfrozen one in the same process (the
        # archiver times both) would run the unfrozen graphs and never freeze.
        # (torch.compile takes a mode or options, not both: the mode's options then go in too.)
        # The conv weights are not pre-packed: pre-packed weights are oneDNN tensors, which
        # inductor's graph cache cannot pickle, so it would skip every frozen backbone and each
        # restarted worker would lower it again. Pre-packing measured no faster on the CPU
        # (lite0, resnet50, mobilenet_v2, batch 1 and 8, either layout): folding the batch norms
        # and constants is what freezing gives.
        compile_options = None
        if self.frozen:
            from torch._inductor import list_mode_options

            compile_options = {**(list_mode_options(mode, False) if mode else {}), "freezing": True,
                               "cpp.weight_prepack": False, **(options or {})}
            mode = None
        engine.model = torch.compile(engine.model, backend=backend, mode=mode or None, dynamic=False,
                                     options=compile_options)
        if self.frozen:
            engine.model = _Frozen(engine.model)
        engine.batch_buckets = self.sizes if batch_mode == "buckets" else None
        engine.dynamic_batch = batch_mode == "dynamic"
        self.active = True
        self.graphs = 0

    def warm_up(self, run: Callable[[int], object]) -> dict[int, float]:
        """Compile every graph a batch can need by running ``run(n)`` for each size; seconds each.

        On any failure (no C++ compiler, an operator the backend cannot handle) the engine goes
        back to its eager model, one warning says why, and the exception is not raised.
        """
        seconds = {}
        try:
            for size in self.sizes:
                started = time.perf_counter()
                run(size)
                seconds[size] = time.perf_counter() - started
        except Exception as exc:  # compiling must never stop a load: serve eager
            logger.warning("torch.compile failed (%s: %s); serving the eager model",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.fall_back()
        self.graphs = _graph_count()
        return seconds

    def check(self, batch: int) -> None:
        """Warn when a batch compiled a graph after load (it paid for compiling)."""
        graphs = _graph_count()
        if graphs != self.graphs:
            logger.warning("a batch of %d compiled %d new graph(s) after load", batch, graphs - self.graphs)
            self.graphs = graphs

    def fall_back(self) -> None:
        """Serve the eager model from now on."""
        self.engine.model = self.eager
        self.engine.batch_buckets = None
        self.engine.dynamic_batch = False
        setattr(self._parent, self._child, self.engine.layer)
        self.engine.capture = None
        self.active = False
