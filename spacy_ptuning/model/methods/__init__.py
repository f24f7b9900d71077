"""The P-Tuning methods, PEFT-style: one module per method, each holding the
torch module of its prompts and its settings dataclass, registered by name.

A method's settings (a :class:`MethodSettings` subclass) say which options
it takes (its dataclass fields beyond the common ones), check them against
a backbone (``validate``) and build its prompt module (``build``). The
adapter builds its settings here (``settings_for``) from the flat options
that configs give, keeps them (``Adapter.settings``) and the saved adapter's
header records them, so adding a method is one module with one registered
class: in this
package, or in another package under the ``spacy_ptuning_methods`` entry
point group (catalogue reads it), e.g.
``[project.entry-points.spacy_ptuning_methods] my_method = "pkg.mod:MySettings"``.

Every prompt module returns the prompts of one row, in the one layout the
prompted pass (``model.encode``) takes: (V, embed_width) input prompts or
(layers, 2, P, kv_width) key/value prefixes.
"""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Type

import catalogue
from torch import nn

from ...errors import ConfigError, Errors

methods = catalogue.create("spacy_ptuning", "methods", entry_points=True)

# Input-prompt methods must leave at least this many positions for the text
# (special tokens included): fewer cannot hold a sentence of a few words.
MIN_TEXT_POSITIONS = 16


@dataclass
class MethodSettings:
    """What every method takes; subclasses add their own options as fields
    (with defaults) and set ``input_prompts``."""

    num_virtual_tokens: int = 16
    prompt_dropout: float = 0.0

    name: ClassVar[str] = ""
    # The virtual tokens are input embeddings, so they take positions of the
    # backbone (and are dropped from the output); else they are per-layer
    # key/value prefixes, which take none.
    input_prompts: ClassVar[bool] = False

    @classmethod
    def options(cls) -> Dict[str, object]:
        """This method's own options and their defaults."""
        common = {f.name for f in dataclasses.fields(MethodSettings)}
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in common}

    def validate(self, backbone) -> None:
        """Refuse settings that cannot work on ``backbone``, before anything
        is built (a numbered ConfigError that says what to set)."""
        self.check()
        self.check_backbone(backbone)

    def check(self) -> None:
        """The checks that need no backbone: length, the method's own
        options, dropout."""
        _check_length(self.num_virtual_tokens)
        self.validate_options()
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(Errors.E012.format(option="prompt_dropout", rule="in [0, 1)", value=self.prompt_dropout))

    def check_backbone(self, backbone) -> None:
        """Input prompts must leave the text room in the backbone's positions."""
        n = self.num_virtual_tokens
        if self.input_prompts and backbone.max_length - n < MIN_TEXT_POSITIONS:
            raise ConfigError(
                Errors.E013.format(
                    method=self.name,
                    n=n,
                    left=max(0, backbone.max_length - n),
                    max_length=backbone.max_length,
                    minimum=MIN_TEXT_POSITIONS,
                    most=max(0, backbone.max_length - MIN_TEXT_POSITIONS),
                )
            )

    def validate_options(self) -> None:
        """Checks of the method's own options (none by default)."""

    def build(self, backbone) -> nn.Module:
        """The prompt module (its forward() gives one row of prompts)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


def register(name: str):
    """Class decorator: register a MethodSettings subclass as ``name``."""

    def wrap(cls: Type[MethodSettings]) -> Type[MethodSettings]:
        cls.name = name
        methods.register(name, func=cls)
        return cls

    return wrap


def method_names() -> List[str]:
    """Every registered method, in registration order (built-ins first)."""
    return list(methods.get_all())


def _check_length(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(Errors.E004.format(n=n))


def settings_for(method: str, num_virtual_tokens: int = 16, prompt_dropout: float = 0.0, **options) -> MethodSettings:
    """The settings of ``method`` from flat options (as configs give them):
    E003 for an unknown method, E004 for a bad length, E011 for an option of
    another method set to other than its default (options of other methods
    at their defaults are ignored, so one flat config block serves every
    method). The checks of the values themselves: ``check()``."""
    try:
        cls = methods.get(method)
    except catalogue.RegistryError:
        raise ConfigError(Errors.E003.format(method=method, choices=", ".join(method_names()))) from None
    _check_length(num_virtual_tokens)
    own = cls.options()
    foreign = {k: v for k, v in options.items() if k not in own}
    if foreign:
        known = methods.get_all()
        for option, value in foreign.items():
            owners = [name for name, other in known.items() if option in other.options()]
            if not owners:
                raise TypeError(f"unknown option {option!r} for method {method!r}")
            if value != known[owners[0]].options()[option]:
                raise ConfigError(Errors.E011.format(option=option, value=value, method=method, used_by=", ".join(owners)))
    return cls(
        num_virtual_tokens=num_virtual_tokens,
        prompt_dropout=prompt_dropout,
        **{k: v for k, v in options.items() if k in own},
    )


# The built-in methods register themselves on import.
from . import prefix, prompt_encoder, prompt_tuning  # noqa: E402,F401
from .prefix import PrefixEncoder  # noqa: E402
from .prompt_encoder import PromptEncoder  # noqa: E402
from .prompt_tuning import SoftPrompt  # noqa: E402

__all__ = ["MIN_TEXT_POSITIONS", "MethodSettings", "PrefixEncoder", "PromptEncoder", "SoftPrompt", "method_names", "methods", "register", "settings_for"]
