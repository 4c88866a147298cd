"""What every subcommand shares: argument types and groups, choices read from the registries, the cheap checks
that run before a model loads, model loading and sampler settings, and the error policy with its exit codes.

Error policy: a user-fixable problem (a :class:`~diffmem.errors.DiffmemError`, or an OS error on a named path) ends
in one line ``diffmem: error: ...`` and exit status 2, as argparse's own usage errors do (:class:`Parser`); anything
else is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError, DiffmemError

# every command logs under "diffmem", so that its lines read ``INFO diffmem: ...`` whichever module wrote them
logger = logging.getLogger("diffmem")

EXIT_OK = 0
EXIT_USER_ERROR = 2  # argparse's own status for a usage error; a bug's traceback exits with 1

Command = Callable[[argparse.Namespace], Any]


# ---------------------------------------------------------------------------------------------------------------
# argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def nonneg_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def folds(text: str) -> int:
    value = nonneg_int(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 fold leaves nothing out: give 0 (off) or >= 2")
    return value


def size(text: str) -> int:
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{text} must be a positive multiple of 8")
    return value


def float_type(accept: Callable[[float], bool], bound: str) -> Callable[[str], float]:
    """An argparse type: a float for which ``accept`` holds, else the error ``<text> must be <bound>``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value

    return parse


fraction = float_type(lambda v: 0 < v <= 1, "in (0, 1]")
rate = float_type(lambda v: 0 <= v <= 1, "in [0, 1]")
positive_float = float_type(lambda v: v > 0, "> 0")


def scheduler_name(text: str) -> str:
    from diffmem.config import scheduler_names

    names = scheduler_names()
    if text not in names:
        close = difflib.get_close_matches(text, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a diffusers scheduler{hint}; choose one of {', '.join(names)}")
    return text


# ---------------------------------------------------------------------------------------------------------------
# choices read from the registries


class RegistryChoices:
    """The ``choices`` of a flag, read from a registry each time a value is checked or the help is shown.

    A name registered after the parser is built (``register_locator``, ``register_detector``) is accepted, and
    building the parser imports nothing heavy.

    Args:
        names: Returns the registered names, in the order the help lists them.
    """

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names = names

    def __contains__(self, name: object) -> bool:
        return name in list(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names()))


def _locators() -> list[str]:
    """The registered locate methods: the built-in ones in their documented order, then the others.

    Nothing can register a locator without importing :mod:`diffmem.localization`; until then the built-ins are the
    whole registry, so building the parser or showing the help imports no torch.
    """
    from diffmem.config import LOCATE_METHODS

    registry = sys.modules.get("diffmem.localization")
    names = registry.list_locators() if registry is not None else list(LOCATE_METHODS)
    return [m for m in LOCATE_METHODS if m in names] + [m for m in names if m not in LOCATE_METHODS]


def _detectors() -> list[str]:
    from diffmem.detection import list_detectors

    return list_detectors()


def _locate_presets() -> list[str]:
    from diffmem.config import LOCATE_PRESETS

    return list(LOCATE_PRESETS)


def _halves() -> list[str]:
    from diffmem.config import HALVES_CHOICES

    return list(HALVES_CHOICES)


LOCATORS = RegistryChoices(_locators)
DETECTORS = RegistryChoices(_detectors)  # read when a value is checked or the help is shown (``metavar="NAME"``)
LOCATE_PRESETS = RegistryChoices(_locate_presets)
HALVES = RegistryChoices(_halves)


# ---------------------------------------------------------------------------------------------------------------
# shared argument groups


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="diffusers pipeline folder or hub id")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickled .bin weights and torchscript (unsafe)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weight dtype")


# SamplerConfig field <- command-line destination, for every command that samples
SAMPLER_FLAGS = (("num_inference_steps", "steps"), ("guidance_scale", "guidance"),
                 ("guidance_rescale", "guidance_rescale"), ("height", "height"), ("width", "width"),
                 ("scheduler", "scheduler"))


def add_region(p: argparse.ArgumentParser) -> None:
    """``--region``: where replication is also measured (``EvalConfig.region``; the choices are
    ``diffmem.detectors.region.REGIONS``, spelled out so that building the parser imports no model code)."""
    p.add_argument("--region", choices=("full", "bright-ending"), default="full",
                   help="where replication is also measured: full (the whole image only) or bright-ending (each "
                        "generation's Bright Ending mask, for local or template memorization; the report shows it "
                        "over the image)")


def add_sampling(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    """The sampler flags shared by every command that generates images (see ``SamplerConfig``)."""
    g = p.add_argument_group("sampler", "a flag given here always wins; otherwise the model's diffmem_defaults.json, "
                                        "else the pipeline's own defaults")
    g.add_argument("--steps", type=positive_int, default=None, help="sampler steps")
    g.add_argument("--guidance", type=float_type(lambda v: v >= 0, ">= 0"), default=None, help="CFG scale")
    g.add_argument("--guidance-rescale", type=rate, default=None, help="guidance rescale in [0, 1] (0: off)")
    g.add_argument("--height", type=size, default=None, help="image height, a multiple of 8")
    g.add_argument("--width", type=size, default=None, help="image width, a multiple of 8")
    g.add_argument("--scheduler", type=scheduler_name, default=None, metavar="NAME",
                   help="diffusers scheduler class (e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler), built "
                        "from the model's scheduler config")
    if batch_size:
        g.add_argument("--batch-size", type=positive_int, default=None, help="images (or prompts) per pipeline call")


def add_references(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-references", action="store_true",
                   help="accept reference paths outside the manifest's folder")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out rows whose reference cannot be downloaded or read (each is reported), instead of "
                        "stopping at the first")


def add_command(sub: Any, name: str, func: Command, help: str, *, model: bool = False) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` to the subparsers ``sub``, run by ``func(args)``, and return its parser; with
    ``model``, the command takes a model (:func:`add_model`)."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=func)
    if model:
        add_model(p)
    return p


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``diffmem: error: ...``, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("diffmem").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USER_ERROR, f"diffmem: error: {where}{' '.join(message.split())} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------------------
# checks that run before the model loads


def need_model(args: argparse.Namespace) -> None:
    from diffmem.pipelines import check_model

    check_model(args.model, allow_pickle=getattr(args, "allow_pickle", False))
    check_device(getattr(args, "device", None))


def need_file(path: str | None, what: str) -> None:
    from diffmem.errors import PromptFileError

    if path is not None and not Path(path).is_file():
        raise PromptFileError(f"{what} {path} does not exist")


def need_edit(path: str | None) -> None:
    from diffmem.files import pair_paths

    if path is not None and not pair_paths(path)[0].is_file():
        raise DiffmemError(f"edit file {pair_paths(path)[0]} does not exist (--edit)")


def need_repo_id(repo_id: str | None) -> None:
    from huggingface_hub.utils import validate_repo_id

    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except ValueError:
            raise ConfigError(f"--push-to-hub {repo_id!r}: not a Hub repo id (namespace/name)") from None


def need_suffix(path: str, suffixes: tuple[str, ...], flag: str) -> None:
    if Path(path).suffix not in suffixes:
        raise ConfigError(f"{flag} {path}: use a {' or '.join(suffixes)} suffix")


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine")


# ---------------------------------------------------------------------------------------------------------------
# inputs, model, sampler and outputs


def fetch(args: argparse.Namespace, entries: list) -> tuple[list, list[dict]]:
    """Download URL references into the cache and check local ones, before the model loads.

    Returns:
        The usable entries and, with ``--skip-missing``, one record per left-out row (else the first failure raises).
    """
    from diffmem.data import fetch_references

    ok, failures = fetch_references(entries, skip_missing=args.skip_missing,
                                    allow_outside=getattr(args, "allow_outside_references", False))
    return ok, [f.to_dict() for f in failures]


def entries(args: argparse.Namespace, split: str | None = None) -> list:
    from diffmem.data import read_entries

    rows = read_entries(args.prompts, allow_outside=getattr(args, "allow_outside_references", False))
    rows = [e for e in rows if split is None or e.split == split]
    args._prompts = [e.prompt for e in rows]  # checked against the text encoder's length once loaded
    return rows


def load(args: argparse.Namespace) -> Any:
    import torch

    from diffmem.pipelines import load_pipeline, quiet_diffusers, warn_long_prompts

    quiet_diffusers()
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, torch_dtype=dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = getattr(args, "_prompts", None)
    if prompts:
        warn_long_prompts(pipe, prompts)
    return pipe


def sampler_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings given on the command line (``SamplerConfig`` field names)."""
    return {field: getattr(args, dest) for field, dest in SAMPLER_FLAGS if getattr(args, dest, None) is not None}


def sampler(args: argparse.Namespace, model: Any = None) -> Any:
    """Sampler settings: the flags given, over the model's ``diffmem_defaults.json``, over the pipeline's defaults.

    Args:
        args: The parsed command line.
        model: The model folder, hub id or loaded pipeline (default: ``args.model``).

    Returns:
        A :class:`~diffmem.config.SamplerConfig`.
    """
    from diffmem.config import SamplerConfig

    return SamplerConfig.resolve(args.model if model is None else model, **sampler_flags(args))


def sample_with(args: argparse.Namespace, pipe: Any) -> Any:
    """Sampler settings on the loaded pipeline, and its scheduler swapped for the one chosen.

    The flags given win over the pipeline's folder defaults and its own (its image size and scheduler included);
    the settings found before loading (:func:`sampler`) only checked the flags early.

    Returns:
        The :class:`~diffmem.config.SamplerConfig` used, as every output records it.
    """
    chosen = sampler(args, pipe)
    chosen.apply_scheduler(pipe)
    return chosen


def scorer(name: str, args: argparse.Namespace) -> Any:
    from diffmem.score import get_scorer

    weights = getattr(args, "scorer_weights", None)
    if name == "sscd":
        kwargs: dict[str, Any] = {"allow_pickle": getattr(args, "allow_pickle", False)}
        if weights:
            return get_scorer(name, weights=weights, **kwargs)  # the user's file: no silent fallback
        return get_scorer(name, fallback="ssim", **kwargs)
    if weights:
        raise ConfigError(f"--scorer-weights applies to --scorer sscd, not {name!r}")
    return get_scorer(name)


def write_json(path: str | Path, obj: Any) -> None:
    from diffmem.files import write_json as write

    write(Path(path), obj)


def push(folder: Path, repo_id: str) -> None:
    """Upload a finished export; a failure names the repository and leaves the export in place."""
    from diffmem.errors import PushError
    from diffmem.modelcard import push_to_hub

    try:
        url = push_to_hub(folder, repo_id)
    except PushError as err:
        raise PushError(f"{err} (the export {folder} is complete; retry with: hf upload {repo_id} {folder})") from err
    logger.info("pushed %s to %s", folder, url)


# ---------------------------------------------------------------------------------------------------------------
# logging, threads and the error policy


def setup_logging(verbose: bool) -> None:
    """One line per record (``LEVEL name: message``), debug with ``--verbose``; the torch threads chosen once."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _cap_threads()
    for noisy in ("httpx", "urllib3", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@functools.cache
def _cap_threads() -> None:
    """Use only the CPUs that are free: on a shared machine, idle-spinning threads can slow torch down 30-fold.

    ``OMP_NUM_THREADS`` set by the user wins; otherwise the CPUs idle over the next 0.3 s (from ``/proc/stat``, not
    the load average, which trails by a minute), at least one. Once per process; the choice is logged in one line.
    """
    from diffmem.parallel import choose_num_threads

    threads, why = choose_num_threads()
    if threads is None:
        logger.info("torch threads: as %s", why)
        return
    import torch

    threads = min(threads, torch.get_num_threads())
    torch.set_num_threads(threads)
    logger.info("torch threads: %d (%s; set OMP_NUM_THREADS to choose)", threads, why)


_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.func(args)`` under the error policy.

    Args:
        args: The parsed command line (``func`` and ``verbose`` set).

    Returns:
        ``EXIT_OK``, or ``EXIT_USER_ERROR`` after printing ``diffmem: error: ...`` for a user error. With
        ``--verbose``, a user error keeps its traceback too; any other exception propagates.
    """
    try:
        args.func(args)
    except (DiffmemError, *_PATH_ERRORS) as err:
        if args.verbose or (isinstance(err, OSError) and err.filename is None):
            raise
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"diffmem: error: {msg}", file=sys.stderr)  # noqa: T201
        return EXIT_USER_ERROR
    finally:
        _shutdown_process_group()
    return EXIT_OK


def _shutdown_process_group() -> None:
    """Leave the process group cleanly under ``accelerate launch`` (an abandoned gloo group can abort at exit)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
