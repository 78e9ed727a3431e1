"""The YAML reading of a policy file: the same numbers as inside an ``optlab`` config.

PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string and ``2001-12-14`` a date;
jsonargparse, which reads LightningCLI configs, resolves floats as YAML 1.2 does and keeps
dates as text. A policy file is read the same way, so one text means one policy wherever it sits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class PolicyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """SafeLoader with YAML 1.2 floats and without timestamps."""


PolicyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
PolicyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def load_yaml(text: str, origin: str) -> Any:
    """``text`` parsed; a syntax error names ``origin`` (a file or "policy YAML text") and the line."""
    try:
        return yaml.load(text, Loader=PolicyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{origin} is not valid YAML{at}: {getattr(err, 'problem', err)}") from None


def read_yaml_file(path: str | Path, what: str = "policy file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return load_yaml(path.read_text(), f"{what} {str(path)!r}")
