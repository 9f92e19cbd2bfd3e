"""One validator per argument of the flows, and the one rule for the default group width.

The library (``tvm_scalpel.flows``, ``tvm_scalpel.api``, ``finetune``, ``node_pruning``) calls
the ``check_*`` functions on values; the command line's argparse types (``parse_*``) turn its
text into a value with the same rules, so a bad ``--rate`` and a bad ``rate=`` are refused
alike. Nothing here imports TVM: the command line uses it before TVM is loaded.
"""

from __future__ import annotations

from numbers import Integral

from .errors import ScalpelError

IMPORTANCES: tuple[str, ...] = ("rms", "max", "mean")  # group importance: see pruning.py
MODES: tuple[str, ...] = ("auto", "sparse", "dense")  # how compile lowers a dense layer
POLICIES: tuple[str, ...] = ("none", "rules", "measured")  # see policy.py
NODE_CRITERIA: tuple[str, ...] = ("masks", "l1", "l2")  # see finetune.node_prune
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
NUMERICS: tuple[str, ...] = ("fp32", "q15")  # a Cortex-M4 project's arithmetic
AUTO = "auto"  # group_width="auto": each layer's fastest g in the tuning database


def _message(what: str | None, rule: str) -> str:
    return f"{what} {rule}" if what else rule


def check_rate(value, what: str | None = "pruning rate", where: str = "",
               error: type[Exception] = ScalpelError) -> float:
    """A pruning rate (of weights or nodes): a fraction in [0, 1)."""
    if not 0.0 <= float(value) < 1.0:
        raise error(_message(what, f"must be in [0, 1), got {value}{where}"))
    return value


def check_group_width(value, what: str | None = "group width", allow_auto: bool = False,
                      error: type[Exception] = ScalpelError) -> int | str | None:
    """g, weights per group: an integer >= 1, None (the target's default) or, where the caller
    can look it up in a tuning database, ``"auto"``."""
    if value is None or (allow_auto and value == AUTO):
        return value
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise error(_message(what, f"must be an integer >= 1, got {value!r}"))
    if value < 1:
        raise error(_message(what, f"must be >= 1, got {value}"))
    return value


def default_group_width(profile, group_width: int | str | None) -> int:
    """The group width a layer gets when no per-layer choice applies: the one asked, else the
    target's group width (its SIMD width; also for ``"auto"`` layers the database knows
    nothing about)."""
    return profile.group_width if group_width in (None, AUTO) else group_width


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ScalpelError(f"unknown {what} {value!r}: use one of {', '.join(choices)}")
    return value


def check_importance(value: str) -> str:
    return check_choice(value, IMPORTANCES, "importance")


def check_mode(value: str) -> str:
    if value not in MODES:  # the message compile has always given
        raise ScalpelError(f"unknown mode {value!r}: use auto, sparse or dense")
    return value


def check_policy(value: str) -> str:
    return check_choice(value, POLICIES, "policy")


def check_count(value: int, what: str | None, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (epochs, trials, batch sizes)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ScalpelError(_message(what, f"must be an integer, got {value!r}"))
    if value < minimum:
        raise ScalpelError(_message(what, f"must be >= {minimum}, got {value}"))
    return value


# --------------------------------------------------------------------------- the CLI's argparse types
# argparse shows an ArgumentTypeError as "argument --rate: <message>"; the rules are the ones above.


def _argparse(fn):
    def parse(text: str):
        import argparse

        try:
            return fn(text)
        except ScalpelError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = fn.__name__
    return parse


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ScalpelError(f"not an integer: {text!r}") from None


@_argparse
def parse_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScalpelError(f"not a number: {text!r}") from None
    return check_rate(value, None)


@_argparse
def parse_group_width(text: str) -> int | str:
    return text if text == AUTO else check_group_width(_integer(text), None)


@_argparse
def parse_positive(text: str) -> int:
    return check_count(_integer(text), None, 1)


@_argparse
def parse_non_negative(text: str) -> int:
    return check_count(_integer(text), None, 0)


@_argparse
def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds (a timeout)."""
    try:
        value = float(text)
    except ValueError:
        raise ScalpelError(f"not a number: {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise ScalpelError(f"must be a positive number of seconds, got {text}")
    return value
