"""Pieces every command shares: the console, error reporting, and the read options."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from ..errors import MWMError

console = Console(stderr=True)
out = Console()


def handle_errors(fn):
    """Report :class:`MWMError` as one red line (no traceback) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MWMError as e:
            console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file with options (CLI options win).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override one config key: --set a.b=value (repeatable).")]
Window = Annotated[Optional[str], typer.Option(help="Intensity window: auto, minmax, lung, mediastinum, brain, bone.")]
WindowCenter = Annotated[Optional[float], typer.Option(help="Custom window centre (raw units, HU for CT).")]
WindowWidth = Annotated[Optional[float], typer.Option(help="Custom window width.")]
Axis = Annotated[Optional[int], typer.Option("--axis", help="NIfTI slice axis in RAS+: 0 sagittal, 1 coronal, 2 axial.")]
SliceStart = Annotated[Optional[int], typer.Option(help="NIfTI: first slice index to read.")]
SliceStop = Annotated[Optional[int], typer.Option(help="NIfTI: slice index to stop before.")]
SkipEmpty = Annotated[Optional[bool], typer.Option("--skip-empty/--keep-empty", help="NIfTI: leave out empty slices.")]
Labels = Annotated[Optional[str], typer.Option(help="Folder labels: none, or folders (one subfolder per class).")]
Strict = Annotated[Optional[bool], typer.Option("--strict/--lenient", help="Fail on the first unreadable file instead of skipping it.")]


def read_option_values(window, window_center, window_width, axis, slice_start, slice_stop, skip_empty, labels,
                       strict) -> dict:
    """CLI values → dotted keys of :class:`mwm.data.ReadOptions` (None = not given)."""
    return {"read.window": window, "read.window_center": window_center, "read.window_width": window_width,
            "read.nifti_axis": axis, "read.slice_start": slice_start, "read.slice_stop": slice_stop,
            "read.skip_empty_slices": skip_empty, "read.labels": labels, "read.strict": strict}

# Options every transfer command (finetune, segment, detect) takes.
WeightsOpt = Annotated[Optional[str], typer.Option(help="RUN/encoder.pth (or RUN/) from `mwm pretrain`, 'none' (random "
                                                        "init, needs --arch) or 'timm' (ImageNet, online).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="[default: 0]")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps. [default: auto]")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="32-true, bf16-mixed or 16-mixed. [default: 32-true]")]
ResizeOpt = Annotated[Optional[str], typer.Option(help="pad, stretch or crop. [default: pad]")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bar or per-epoch lines.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout.")]
# finetune and segment (detect names its ResNets and its own default size)
TimmArchOpt = Annotated[Optional[str], typer.Option(help="timm name. [default: from encoder.json]")]
InputSizeOpt = Annotated[Optional[int], typer.Option(help="Input side in pixels. [default: the encoder's pretraining "
                                                          "size, else 64]")]


def require_transfer_args(out, weights, config, outputs: str, need_weights: bool = True) -> None:
    """The checks every transfer command makes before resolving its config: ``--out`` (``outputs`` says what goes
    there) and, unless ``need_weights`` is false (detect defaults to random init), ``--weights`` — both may come
    from ``--config`` instead."""
    if out is None and not config:
        raise MWMError(f"give --out DIR for {outputs}")
    if need_weights and weights is None and not config:
        raise MWMError("give --weights RUN/encoder.pth (from `mwm pretrain`), --weights none --arch ARCH (random "
                       "init) or --weights timm --arch ARCH (ImageNet, online)")


class TaskBars:
    """Rich progress on stderr with named bars, started on the first event and stopped by :meth:`close`.

    Commands subclass it and turn their run's progress events ``(kind, done, total, info)`` into :meth:`_task`
    calls; nothing is drawn when ``enabled`` is false (``--quiet``) or when no event arrives (re-launched DDP
    ranks)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar, self.tasks = enabled, None, {}

    def _task(self, name: str, total, done: int, msg: str = "") -> None:
        """Create bar ``name`` or move it to ``done`` of ``total`` (None: unknown) with a message."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[msg]}"), TimeRemainingColumn(), console=console,
                                transient=True)
            self.bar.start()
        if name not in self.tasks:
            self.tasks[name] = self.bar.add_task(name, total=total, completed=done, msg=msg)
        else:
            self.bar.update(self.tasks[name], total=total, completed=done, msg=msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar, self.tasks = None, {}


@contextlib.contextmanager
def count_bar(label: str):
    """A transient rich bar on stderr counting items of unknown total; yields ``advance(k)`` for a job's
    ``progress`` callback (``mwm localize``, ``mwm localize-tune``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda k: bar.advance(task, k)


def run_with_bar(fn, cfg, bar: TaskBars, quiet_unreadable: bool = True):
    """``fn(cfg, progress=bar)`` with the bar closed however it ends. ``quiet_unreadable``: hide the per-file
    "could not be read" warnings, which decoding counts and the command reports."""
    import warnings

    try:
        with warnings.catch_warnings():
            if quiet_unreadable:
                warnings.filterwarnings("ignore", message=r".*(could not be read|cannot read).*")
            return fn(cfg, progress=bar)
    finally:
        bar.close()
