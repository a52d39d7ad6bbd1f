"""Prompts from templates: a class name (or its forms) filled into a template.

Shared by the evaluators (zero-shot prompts) and the embedded worlds (their tokenizer corpus holds
every filled prompt), so neither depends on the other.
"""

from __future__ import annotations

from typing import Mapping


def format_prompt(template: str, name: str | Mapping[str, str]) -> str:
  """`template` with a class name filled in.

  A name is a string, which fills "{}", or a mapping of its forms: "name" fills "{}" and any other
  key fills the field of that name, so that {"name": "red cross", "plural": "red crosses"} gives
  "two red crosses." for "two {plural}.".
  """
  if isinstance(name, str):
    default, forms = name, {}
  else:
    forms = dict(name)
    if "name" not in forms:
      raise ValueError(f"class name {name!r} has no \"name\" form")
    default = forms.pop("name")
  try:
    return template.format(default, **forms)
  except KeyError as e:
    raise ValueError(f"template {template!r} needs the form {e} of class name {name!r}, which has "
                     f"only {['name', *forms]}") from None
  except IndexError:
    raise ValueError(f"template {template!r} has more than one \"{{}}\"") from None
