"""Find the feed-forward output layers of a diffusion denoiser.

The default targets are the last ``nn.Linear`` of every diffusers ``FeedForward`` (``...ff.net.2`` in Stable
Diffusion); a user pattern (a regex, or a dotted name suffix) overrides them. A pattern that matches nothing
raises :class:`~diffmem.errors.TargetNotFoundError` listing candidate layer names.
"""

from __future__ import annotations

import difflib
import logging
import re

from torch import nn

from .errors import TargetNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["find_targets", "get_denoiser", "model_source", "is_regex", "linear_names"]

# "." is deliberately absent: it separates module names, so "ff.net.2" is a plain suffix.
_REGEX_CHARS = frozenset("^$*+?{}[]|()\\")
_MAX_CANDIDATES = 6


def get_denoiser(obj: object) -> nn.Module:
    """Return the denoising network of a pipeline, or the module itself.

    Args:
        obj: A diffusers pipeline (with a ``unet`` or ``transformer`` component) or an ``nn.Module``.

    Returns:
        The denoiser module.

    Raises:
        TypeError: ``obj`` is neither a module nor a pipeline with a denoiser.
    """
    if isinstance(obj, nn.Module):
        return obj
    for attr in ("unet", "transformer"):
        module = getattr(obj, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(
        f"expected a diffusers pipeline with a unet or transformer, or an nn.Module; got {type(obj).__name__}"
    )


def model_source(obj: object) -> str | None:
    """The path or hub id a pipeline (or its denoiser) was loaded from (its ``_name_or_path``), if known."""
    for holder in (obj, get_denoiser(obj)):
        config = getattr(holder, "config", None)
        name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
        if name:
            return str(name)
    return None


def is_regex(pattern: str) -> bool:
    """Whether a target pattern is treated as a regex (it has a metacharacter other than ``.``).

    Args:
        pattern: The user's target pattern.

    Returns:
        ``True`` when the pattern is matched with ``re.fullmatch``, ``False`` for a name-suffix match.
    """
    return any(c in _REGEX_CHARS for c in pattern)


def linear_names(denoiser: nn.Module) -> list[str]:
    """Names of all ``nn.Linear`` modules of a denoiser, in module order.

    Args:
        denoiser: The denoising network.

    Returns:
        Module names relative to ``denoiser``.
    """
    return [name for name, module in denoiser.named_modules() if isinstance(module, nn.Linear)]


def _feed_forward_outputs(denoiser: nn.Module) -> dict[str, nn.Linear]:
    from diffusers.models.attention import FeedForward

    found: dict[str, nn.Linear] = {}
    for name, module in denoiser.named_modules():
        if not isinstance(module, FeedForward):
            continue
        net = getattr(module, "net", None)
        if net is None:
            continue
        linears = [(i, m) for i, m in enumerate(net) if isinstance(m, nn.Linear)]
        if not linears:
            continue
        index, linear = linears[-1]
        prefix = f"{name}." if name else ""
        found[f"{prefix}net.{index}"] = linear
    return found


def _candidates(names: list[str], pattern: str | None) -> list[str]:
    """A few Linear names to suggest, the ones whose trailing components look most like ``pattern`` first."""
    if not pattern:
        return names[:_MAX_CANDIDATES]
    depth = pattern.count(".") + 1

    def similarity(name: str) -> float:
        tail = ".".join(name.split(".")[-depth:])
        return difflib.SequenceMatcher(None, pattern, tail).ratio()

    return sorted(names, key=similarity, reverse=True)[:_MAX_CANDIDATES]


def find_targets(denoiser: nn.Module, pattern: str | None = None) -> dict[str, nn.Linear]:
    """Find the target ``nn.Linear`` layers of a denoiser.

    Without a pattern the targets are the final Linear of every diffusers ``FeedForward`` (whose input is the
    FFN hidden activation, e.g. the GEGLU output in Stable Diffusion). A pattern with regex metacharacters is
    ``re.fullmatch``-ed against full module names; any other pattern matches a name equal to it or ending in
    ``"." + pattern``. Only ``nn.Linear`` modules are matched.

    Args:
        denoiser: The denoising network (a UNet or a transformer), or a pipeline.
        pattern: Optional regex or name suffix overriding the default targets.

    Returns:
        Name -> Linear, in module order, names relative to the denoiser.

    Raises:
        TargetNotFoundError: Nothing matched; the message lists a few candidate Linear names.
    """
    denoiser = get_denoiser(denoiser)
    model_name = type(denoiser).__name__
    if pattern is None:
        targets = _feed_forward_outputs(denoiser)
        if not targets:
            names = linear_names(denoiser)
            shown = ", ".join(_candidates(names, None)) or "none"
            raise TargetNotFoundError(
                f"no diffusers FeedForward found in {model_name}; pass a target pattern "
                f"(candidates: {shown}; {len(names)} Linear layers in all)"
            )
        logger.debug("found %d FeedForward output layers in %s", len(targets), model_name)
        return targets

    if not pattern.strip():
        raise TargetNotFoundError("target pattern is empty")
    if is_regex(pattern):
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise TargetNotFoundError(f"target pattern {pattern!r} is not a valid regex: {err}") from None

        def matches(name: str) -> bool:
            return regex.fullmatch(name) is not None

    else:

        def matches(name: str) -> bool:
            return name == pattern or name.endswith("." + pattern)

    targets = {
        name: module
        for name, module in denoiser.named_modules()
        if isinstance(module, nn.Linear) and matches(name)
    }
    if not targets:
        names = linear_names(denoiser)
        kind = "regex" if is_regex(pattern) else "suffix"
        shown = ", ".join(_candidates(names, pattern)) or "none"
        raise TargetNotFoundError(
            f"target {kind} {pattern!r} matched no nn.Linear in {model_name} "
            f"(candidates: {shown}; {len(names)} Linear layers in all)"
        )
    logger.debug("target pattern %r matched %d layers in %s", pattern, len(targets), model_name)
    return targets
