"""Batched patch-classifier inference over a slide's patch store: tiles in, class probabilities out.

The path of one batch is: zarr chunk (decompressed once, in a background thread) -> pinned host
buffer (uint8) -> asynchronous copy to the device on a side stream -> on the device: uint8 to
float, ``x / 255``, resize to the model's ``input_px`` (antialiased), stain normalisation if the
model was trained with it, ``(x - mean) / std``, channels_last -> the model under bf16 autocast
(optionally ``torch.compile``-d) -> softmax (and :meth:`measure` for rule-based scorers) ->
results gathered on the device and copied back every few batches without blocking.

Shipping uint8 rather than float32 moves 4x fewer bytes over PCIe, and normalising on the device
costs nothing next to the network. The host never waits for the device inside the loop except
to keep at most a few batches in flight (waiting on an old batch's event, which leaves the
device queue full).

On CPU the same code runs in float32 (bf16 only when asked with ``amp="always"``) on torch's
intra-op threads, while the loader threads decompress the next chunks.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from wsi_her2.devices import DEVICES, resolve_device  # noqa: F401 (re-exported)
from wsi_her2.errors import ConfigError
from wsi_her2.models.capabilities import capabilities_of
from wsi_her2.score import cpu_pool
from wsi_her2.score.cells import CellTable, cells_to_host, concat_cells
from wsi_her2.score.loader import PREFETCH_BATCHES, TileLoader
from wsi_her2.score.scorer import check_model_matches_store

log = logging.getLogger(__name__)

#: Batches whose outputs are concatenated and copied back to the host together.
FLUSH_BATCHES = 8


@dataclass
class InferenceConfig:
    """Settings of :func:`predict_store`.

    Attributes
    ----------
    batch_size
        Tiles per forward pass.
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cuda"`` (or ``"cuda:N"``) or ``"cpu"``.
    tta
        Test-time augmentation: ``False``; ``True`` (the eight dihedral views, ``"d4"``); or a
        view-set name of :data:`wsi_her2.stain.tta.TTA_SETS` (``"flips"``, ``"rot90"``, ``"d4"``).
        Class probabilities are averaged over the views.
    compile
        ``torch.compile`` the device-side step (CUDA only; the first batches pay the compile).
    amp
        bf16 autocast: ``True`` on CUDA only; ``"always"`` on CPU as well; ``False`` never.
    channels_last
        NHWC memory layout for model and input (CUDA only; convolutions run faster in it).
    loader_workers
        Threads decompressing zarr chunks in the background. None (the default): 2 on CPU,
        where the model's own threads need the cores; on CUDA one per CPU this process may use,
        at most 8, because decoding is what feeds the GPU (~0.25 ms a 224 px JPEG tile per
        thread on this project's CPU: 10,000 tiles/s takes ~3 threads' decoding alone).
    cpu_workers
        Processes scoring the rule-based ``ihc_dab`` on CPU, chunk by chunk (:mod:`wsi_her2.score.cpu_pool`):
        this one and ``cpu_workers - 1`` workers. 1 (the default): this process only; None: one
        per CPU this process may use, at most 16 (what ``wsi-her2 score`` asks for). At most one
        process per 512 tiles; every other model is scored in this process.
        Workers are spawned, so a script that asks for them needs Python's
        ``if __name__ == "__main__":`` guard (as for any multiprocessing).
    pin_memory
        Page-locked host buffers so host-to-device copies are asynchronous (CUDA only).
    """

    batch_size: int = 64
    device: str = "auto"
    tta: bool | str = False
    compile: bool = False
    amp: bool | str = True
    channels_last: bool = True
    loader_workers: int | None = None
    pin_memory: bool = True
    cpu_workers: int | None = 1

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an out-of-range setting."""
        if int(self.batch_size) < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.loader_workers is not None and int(self.loader_workers) < 1:
            raise ConfigError(f"--loader-workers must be >= 1, got {self.loader_workers}")
        if self.cpu_workers is not None and int(self.cpu_workers) < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.cpu_workers}")
        if self.amp not in (True, False, "always"):
            raise ConfigError(f"amp must be True, False or 'always', got {self.amp!r}")
        tta_views(self.tta)  # raises on an unknown set


@dataclass
class PredictResult:
    """Per-tile outputs of :func:`predict_store`, indexed like the store's tiles.

    Attributes
    ----------
    probs
        ``(N, C)`` float32 class probabilities for every tile of the store; NaN rows for tiles
        not scored (QC-rejected or not requested).
    scored
        ``(N,)`` bool, True where a tile was scored.
    measurements
        Name -> ``(N,)`` float32 per-tile measurements (NaN where not scored), from the model's
        ``measure()`` when it has one; empty otherwise.
    tiles_per_s
        Scored tiles per second of wall time, reading and warm-up included.
    device
        Device the model ran on, e.g. ``"cuda:0"`` or ``"cpu"``.
    cells
        The scored cells of a cell-level scorer (``ihc_dab``), ``tile`` in store indices; None otherwise.
    """

    probs: NDArray[np.float32]
    scored: NDArray[np.bool_]
    measurements: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    tiles_per_s: float = 0.0
    device: str = "cpu"
    cells: CellTable | None = None


# --------------------------------------------------------------------------------------------
# Device and settings
# --------------------------------------------------------------------------------------------
def tta_views(tta: bool | str) -> tuple[str, ...]:
    """The view names a ``tta`` setting stands for (``("identity",)`` when off)."""
    from wsi_her2.stain.tta import TTA_SETS

    if tta is False or tta is None:
        return ("identity",)
    if tta is True:
        return TTA_SETS["d4"]
    if isinstance(tta, str) and tta in TTA_SETS:
        return TTA_SETS[tta]
    raise ConfigError(f"unknown TTA setting {tta!r}; use True/False or one of {', '.join(TTA_SETS)}")


def model_config(model: torch.nn.Module) -> Any:
    """The :class:`~wsi_her2.models.ModelConfig` a model carries (``wsi_her2_config``)."""
    cfg = getattr(model, "wsi_her2_config", None)
    if cfg is None:
        raise ConfigError(
            f"{type(model).__name__} carries no wsi_her2_config (input size, normalisation, classes); "
            "build it with wsi_her2.models.create_model/load_model"
        )
    return cfg


# --------------------------------------------------------------------------------------------
# Device-side preprocessing
# --------------------------------------------------------------------------------------------
def preprocess_tiles(
    tiles_u8: torch.Tensor,
    *,
    input_px: int,
    mean: Sequence[float],
    std: Sequence[float],
    stain_norm: dict | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` tiles -> normalised float32 ``(B, 3, input_px, input_px)``, on their device.

    The order matches training (:class:`wsi_her2.train.data.TileDataset`): resize, stain
    normalisation, then ``(x / 255 - mean) / std``.
    """
    # NHWC permuted to NCHW *is* channels_last memory: no copy until .float().
    x = tiles_u8.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_px or x.shape[-2] != input_px:
        x = F.interpolate(x, size=(input_px, input_px), mode="bilinear", align_corners=False, antialias=True)
    if stain_norm:
        from wsi_her2.stain.normalize import apply_stain_norm_torch

        x = apply_stain_norm_torch(x, stain_norm)
    if tuple(mean) != (0.0, 0.0, 0.0) or tuple(std) != (1.0, 1.0, 1.0):  # identity: skip two passes
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - m) / s
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def reads_stored_bytes(model: torch.nn.Module, cfg: Any, views: tuple[str, ...]) -> bool:
    """Whether ``model`` scores stored 8-bit tiles as they are (``measure_u8``, e.g. ihc_dab's OpenCV
    kernel), skipping the float conversion: when nothing else (TTA views, stain normalisation,
    mean/std) needs the float tiles."""
    return (
        callable(getattr(model, "measure_u8", None)) and views == ("identity",) and not getattr(cfg, "stain_norm", None)
        and tuple(cfg.mean) == (0.0, 0.0, 0.0) and tuple(cfg.std) == (1.0, 1.0, 1.0)
    )


def _make_step(
    model: torch.nn.Module,
    cfg: Any,
    *,
    views: tuple[str, ...],
    amp_dtype: torch.dtype | None,
    device: torch.device,
    channels_last: bool,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor], dict | None]]:
    """The per-batch device computation: uint8 tiles -> (probs (B, C) float32, measurements, cells or None)."""
    from wsi_her2.stain.tta import VIEWS

    measure = getattr(model, "measure", None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stain_norm = getattr(cfg, "stain_norm", None)

    def forward_probs(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        return torch.softmax(logits.float(), dim=1)

    measure_u8 = getattr(model, "measure_u8", None)
    direct_u8 = reads_stored_bytes(model, cfg, views)

    def step(tiles_u8: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict | None]:
        if direct_u8 and tiles_u8.shape[1] == tiles_u8.shape[2] == int(cfg.input_px):
            out = dict(measure_u8(tiles_u8))
            probs = out.pop("probs").float()
            cells = out.pop("cells", None)
            return probs, {k: v.float() for k, v in out.items()}, cells
        x = preprocess_tiles(
            tiles_u8, input_px=int(cfg.input_px), mean=cfg.mean, std=cfg.std,
            stain_norm=stain_norm, channels_last=channels_last,
        )
        measurements: dict[str, torch.Tensor] = {}
        cells = None
        probs_sum: torch.Tensor | None = None
        n_views = 0
        identity_done = False
        if callable(measure):
            # Measurements describe the tile as cut, so they come from the un-augmented view.
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = dict(measure(x))
            p = out.pop("probs", None)
            cells = out.pop("cells", None)
            measurements = {k: v.float() for k, v in out.items()}
            if p is not None and "identity" in views:
                probs_sum, n_views, identity_done = p.float(), 1, True  # measure() gave the identity view
        for name in views:
            if name == "identity" and identity_done:
                continue
            xv = x if name == "identity" else VIEWS[name](x).contiguous(memory_format=fmt)
            p = forward_probs(xv)
            probs_sum = p if probs_sum is None else probs_sum + p
            n_views += 1
        return probs_sum / n_views, measurements, cells

    return step


class StepCache:
    """Per-batch steps built for a model, held by the caller across :func:`predict_store` calls.

    Building a step is cheap, but ``torch.compile`` of it pays the compile on its first batches;
    a caller that scores several stores with one model object holds one cache for the run and
    passes it to every call, so the compiled graph is reused. The caller's model is never
    modified: the cache keeps its own references (which also keep ``id()``-based keys valid).
    Shapes are static (the last batch is padded in the loop): one graph per step, no recompiles.
    """

    def __init__(self) -> None:
        self._steps: dict[tuple, tuple[torch.nn.Module, Any, Callable]] = {}

    def __len__(self) -> int:
        return len(self._steps)

    def step_for(self, model: torch.nn.Module, cfg: Any, *, compiled: bool, **settings: Any) -> Callable:
        """The step for ``model`` with these settings, built (and compiled when asked) on first use."""
        key = (id(model), id(cfg), compiled, tuple(sorted((k, str(v)) for k, v in settings.items())))
        hit = self._steps.get(key)
        if hit is not None and hit[0] is model and hit[1] is cfg:
            return hit[2]
        step = _make_step(model, cfg, **settings)
        if compiled:
            step = torch.compile(step, dynamic=False)
        self._steps[key] = (model, cfg, step)
        return step


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _select_indices(store: Any, indices: NDArray | None) -> NDArray[np.int64]:
    n = int(store.n_tiles)
    if indices is None:
        return np.flatnonzero(np.asarray(store.qc_pass, dtype=bool)).astype(np.int64)
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ConfigError(f"a boolean tile mask must have one entry per tile ({n}), got shape {idx.shape}")
        return np.flatnonzero(idx).astype(np.int64)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ConfigError(f"tile indices must be integers, got dtype {idx.dtype}")
    idx = np.unique(idx.astype(np.int64).ravel())  # sorted: chunk-aligned reads need it
    if idx.size and (idx[0] < 0 or idx[-1] >= n):
        raise ConfigError(f"tile indices must lie in [0, {n}) for this store; got {idx[0]}..{idx[-1]}")
    return idx


@dataclass(frozen=True)
class _RunPlan:
    """How one :func:`predict_store` call runs, resolved from :class:`InferenceConfig` and the device."""

    device: torch.device
    views: tuple[str, ...]
    amp_dtype: torch.dtype | None
    channels_last: bool
    pin_memory: bool
    compiled: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _plan_run(config: InferenceConfig) -> _RunPlan:
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    amp_on = config.amp == "always" or (config.amp is True and cuda)
    if config.compile and not cuda:
        log.info("torch.compile is used on CUDA only; running eagerly on %s", device)
    return _RunPlan(
        device=device, views=tta_views(config.tta), amp_dtype=torch.bfloat16 if amp_on else None,
        channels_last=bool(config.channels_last and cuda), pin_memory=bool(config.pin_memory and cuda),
        compiled=bool(config.compile and cuda),
    )


def _ready_step(model: torch.nn.Module, cfg: Any, plan: _RunPlan, step_cache: StepCache) -> Callable:
    """Put the model on the device in eval mode and return its per-batch step (from ``step_cache``)."""
    model.eval()
    model.to(plan.device)
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    return step_cache.step_for(model, cfg, compiled=plan.compiled, views=plan.views, amp_dtype=plan.amp_dtype,
                               device=plan.device, channels_last=plan.channels_last)


def _chunk_workers(store: Any, model: torch.nn.Module, cfg: Any, plan: _RunPlan, config: InferenceConfig,
                   n_tiles: int) -> int | None:
    """Workers for :func:`wsi_her2.score.cpu_pool.score_chunks` (0: in this process), or None: the batch loop.

    Only a scorer with its own CPU kernel (the ``cpu_kernel`` capability, its ``kernel`` not ``"torch"``),
    on CPU, on stored JPEG tiles of its input size, without TTA: exactly the batches the loop would hand
    to ``measure_u8``. With one CPU, chunk by chunk in this process; with more, in worker processes when
    asked for (``cpu_workers``), else the batch loop (its reading threads overlap the kernel).
    """
    from wsi_her2.store.tile_reader import jpeg_chunk_reader

    if plan.cuda or not capabilities_of(model).cpu_kernel or model.kernel == "torch":
        return None
    if not reads_stored_bytes(model, cfg, plan.views) or int(store.tile_px) != int(cfg.input_px):
        return None
    if jpeg_chunk_reader(store) is None:
        return None
    workers = cpu_pool.workers_for(config.cpu_workers, n_tiles)
    if workers:
        return workers
    return 0 if cpu_pool.available_cpus() == 1 else None


#: Default loader threads: on CPU (the model's own threads need the cores), at most on CUDA.
CPU_LOADER_THREADS = 2
MAX_CUDA_LOADER_THREADS = 8


def loader_threads(config: InferenceConfig, plan: _RunPlan) -> int:
    """Threads decoding the store's chunks for the batch loop (see ``InferenceConfig.loader_workers``)."""
    if config.loader_workers is not None:
        return int(config.loader_workers)
    if not plan.cuda:
        return CPU_LOADER_THREADS
    return max(CPU_LOADER_THREADS, min(cpu_pool.available_cpus(), MAX_CUDA_LOADER_THREADS))


def _assemble(host_parts: list, n_total: int, n_classes: int):
    """Per-batch host results -> ``(probs (N, C), scored (N,), measurements, cells)`` indexed like the store."""
    probs = np.full((n_total, n_classes), np.nan, dtype=np.float32)
    scored = np.zeros(n_total, dtype=bool)
    measurements: dict[str, NDArray[np.float32]] = {}
    for part_idx, part_probs, part_meas, _ in host_parts:
        probs[part_idx] = part_probs.numpy()
        scored[part_idx] = True
        for name, values in part_meas.items():
            if name not in measurements:
                measurements[name] = np.full(n_total, np.nan, dtype=np.float32)
            measurements[name][part_idx] = values.numpy()
    return probs, scored, measurements, concat_cells([part[3] for part in host_parts])


def predict_store(
    store: Any,
    model: torch.nn.Module,
    *,
    config: InferenceConfig = InferenceConfig(),
    indices: NDArray | None = None,
    progress: bool = False,
    step_cache: StepCache | None = None,
    chunk_pool: cpu_pool.ChunkPool | None = None,
) -> PredictResult:
    """Score the tiles of a patch store with a patch classifier.

    Parameters
    ----------
    store
        An open :class:`wsi_her2.store.patch_store.PatchStore`.
    model
        A classifier from :func:`wsi_her2.models.create_model` / ``load_model`` (it carries
        ``wsi_her2_config``). It is moved to the device and left there in ``eval()`` mode.
    config
        Device, batch size, precision and loader settings.
    indices
        Tile indices (or an ``(N,)`` bool mask) to score; default: the QC-passed tiles.
    progress
        Show a progress bar.
    step_cache
        A :class:`StepCache` the caller keeps across calls with the same model (a compiled step
        is then compiled once); default: a fresh one for this call.
    chunk_pool
        A :class:`~wsi_her2.score.cpu_pool.ChunkPool` the caller keeps across stores (its worker
        processes start once); default: one for this call, when workers are used at all.

    Returns
    -------
    PredictResult
        Probabilities and measurements for every tile of the store (NaN where not scored).
    """
    config.validate()
    t_start = time.perf_counter()
    cfg = model_config(model)
    plan = _plan_run(config)
    idx = _select_indices(store, indices)
    n_total = int(store.n_tiles)
    n_classes = len(cfg.classes)
    check_model_matches_store(cfg, store, capabilities=capabilities_of(model))  # the one check: every scoring path is here
    step = _ready_step(model, cfg, plan, step_cache if step_cache is not None else StepCache())
    log.info(
        "scoring %d of %d tiles with %s on %s: batch %d, %s, tta %d view(s)%s%s",
        idx.size, n_total, getattr(cfg, "name", type(model).__name__), plan.device, config.batch_size,
        "bf16 autocast" if plan.amp_dtype is not None else "float32", len(plan.views),
        ", channels_last" if plan.channels_last else "", ", compiled" if plan.compiled else "",
    )

    host_parts: list[tuple[NDArray[np.int64], torch.Tensor, dict[str, torch.Tensor], dict | None]] = []
    bar = _progress(idx.size, progress, getattr(store, "slide_id", None))
    workers = _chunk_workers(store, model, cfg, plan, config, idx.size)
    try:
        if workers is not None:
            helpers = f"{workers - 1} worker process" + ("es" if workers > 2 else "")
            log.info("scoring chunk by chunk %s", f"on {workers} CPUs: this process and {helpers}" if workers > 1 else "in this process")
            host_parts = cpu_pool.score_chunks(store, model, idx, workers=workers, bar=bar, pool=chunk_pool)
        else:
            _loop(store, idx, step, plan, config, n_classes, host_parts, bar)
    finally:
        if bar is not None:
            bar.close()

    probs, scored, measurements, cells = _assemble(host_parts, n_total, n_classes)
    seconds = time.perf_counter() - t_start
    rate = idx.size / seconds if idx.size and seconds > 0 else 0.0
    log.info("scored %d tiles in %.2f s (%.0f tiles/s)", idx.size, seconds, rate)
    return PredictResult(probs=probs, scored=scored, measurements=measurements, tiles_per_s=rate, device=str(plan.device),
                         cells=cells)


def _loop(store: Any, idx: NDArray[np.int64], step: Callable, plan: _RunPlan, config: InferenceConfig, n_classes: int,
          host_parts: list, bar: Any) -> None:
    """The batch loop: a :class:`TileLoader` feeding ``step`` (see :func:`_run_loop`)."""
    loader = TileLoader(store, idx, batch_size=config.batch_size, workers=loader_threads(config, plan),
                        pin_memory=plan.pin_memory, prefetch_batches=PREFETCH_BATCHES)
    with torch.inference_mode(), loader:
        _run_loop(
            loader, step, device=plan.device, batch_size=config.batch_size, pad_batches=plan.compiled,
            n_classes=n_classes, host_parts=host_parts, bar=bar,
        )
        if plan.cuda:
            torch.cuda.synchronize(plan.device)  # the non-blocking copies back must have landed


def _run_loop(
    loader: TileLoader,
    step: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor], dict | None]],
    *,
    device: torch.device,
    batch_size: int,
    pad_batches: bool,
    n_classes: int,
    host_parts: list,
    bar: Any,
) -> None:
    cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if cuda else None
    compute_stream = torch.cuda.current_stream(device) if cuda else None
    # Bounded run-ahead: the host may enqueue this many batches before waiting on the oldest one.
    # Without it the host would race ahead of the GPU and device memory would grow with the slide.
    in_flight: deque[Any] = deque()
    max_in_flight = PREFETCH_BATCHES + 2
    pending_idx: list[NDArray[np.int64]] = []
    pending_probs: list[torch.Tensor] = []
    pending_meas: list[dict[str, torch.Tensor]] = []
    pending_cells: list[dict | None] = []

    def flush() -> None:
        if not pending_idx:
            return
        dev_probs = torch.cat(pending_probs)
        dev_meas = {k: torch.cat([m[k] for m in pending_meas]) for k in pending_meas[0]}
        cells = concat_cells([cells_to_host(c, i) for c, i in zip(pending_cells, pending_idx)])
        host_parts.append((np.concatenate(pending_idx), _to_host(dev_probs), {k: _to_host(v) for k, v in dev_meas.items()},
                           None if cells is None else cells.columns))
        pending_idx.clear()
        pending_probs.clear()
        pending_meas.clear()
        pending_cells.clear()

    for batch in loader:
        n = batch.tiles.shape[0]
        tiles = batch.tiles
        if pad_batches and n < batch_size:
            # A compiled step has one static shape: pad the last batch, drop the padding after.
            pad = tiles.new_zeros((batch_size - n, *tiles.shape[1:]))
            tiles = torch.cat([tiles, pad])
        if cuda:
            with torch.cuda.stream(copy_stream):
                x = tiles.to(device, non_blocking=True)
                copied = copy_stream.record_event()
            compute_stream.wait_stream(copy_stream)
            x.record_stream(compute_stream)  # x was allocated on the copy stream
            loader.release(batch, event=copied)
        else:
            x = tiles
        probs, meas, cells = step(x)
        if not cuda:
            loader.release(batch)  # the step converted the buffer to float: it may be refilled
        if probs.shape[-1] != n_classes:
            raise ConfigError(
                f"the model returned {probs.shape[-1]} outputs per tile but its config lists {n_classes} classes; "
                "the weights file and its config do not match"
            )
        pending_idx.append(batch.indices)
        pending_probs.append(probs[:n])
        pending_meas.append({k: v[:n] for k, v in meas.items()})
        pending_cells.append(_real_tiles_only(cells, n))
        if cuda:
            in_flight.append(compute_stream.record_event())
            if len(in_flight) > max_in_flight:
                in_flight.popleft().synchronize()  # an old batch: the device queue stays full
        if len(pending_idx) >= FLUSH_BATCHES:
            flush()
        if bar is not None:
            bar.update(n)
    flush()


def _real_tiles_only(cells: dict | None, n: int) -> dict | None:
    """A batch's cells without those of the padding tiles a compiled step was given (tile index >= ``n``)."""
    if cells is None:
        return None
    keep = cells["tile"] < n
    return {k: v[keep] for k, v in cells.items()}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Copy a device tensor to the host without blocking (read it after a synchronize)."""
    t = t.detach().float()
    if t.device.type != "cuda":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _progress(total: int, enabled: bool, desc: str | None) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or "scoring", unit="tile", smoothing=0.1)


__all__ = [
    "DEVICES",
    "InferenceConfig",
    "PredictResult",
    "StepCache",
    "model_config",
    "predict_store",
    "preprocess_tiles",
    "resolve_device",
    "tta_views",
]
