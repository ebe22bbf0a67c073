"""Checks on class names and prompt templates: every class must reach the text encoder as its own text."""

from __future__ import annotations

from collections import defaultdict

from moder.errors import UserError
from moder.params import check_templates


class PromptError(UserError, ValueError):
    """Class names or templates would give classes the same prompt, or cut it; the message names them."""


def check_prompt_templates(templates: list[str]) -> None:
    """moder.params.check_templates (each template inserts the class name exactly once), as a PromptError."""
    try:
        check_templates(templates)
    except ValueError as error:
        raise PromptError(str(error)) from None


def normalized(name: str) -> str:
    """How CLIP's tokenizer sees a name, near enough: case, '_' and runs of spaces do not count."""
    return " ".join(name.replace("_", " ").lower().split())


def check_class_names(names: list[str]) -> None:
    """Refuse empty names and names that collide once normalised (they would share one prototype)."""
    if not names:
        raise PromptError("no class names given")
    empty = [repr(name) for name in names if not normalized(name)]
    if empty:
        raise PromptError(f"empty class name(s): {', '.join(empty)}")
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[normalized(name)].append(name)
    collisions = ["/".join(repr(n) for n in group) for group in groups.values() if len(group) > 1]
    if collisions:
        raise PromptError(
            f"class names collide once case, '_' and spaces are ignored: {'; '.join(collisions[:5])} "
            "(they would get the same prototype); rename them"
        )
